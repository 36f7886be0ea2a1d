/// Clients waiting for a free upstream, served in arrival order, never more than `limit`.
public struct WaitQueue<Element> {
    private var entries: [(id: UInt64, element: Element)] = []
    private var nextID: UInt64 = 0
    /// The most elements the queue holds (lowering it turns nobody away: it only stops appends).
    public var limit: Int

    public init(limit: Int) {
        self.limit = limit
    }

    public var count: Int { entries.count }
    public var isEmpty: Bool { entries.isEmpty }
    public var isFull: Bool { entries.count >= limit }

    /// Appends an element; returns its ticket, or nil when the queue is full.
    public mutating func append(_ element: Element) -> UInt64? {
        guard entries.count < limit else { return nil }
        nextID &+= 1
        entries.append((nextID, element))
        return nextID
    }

    /// Removes and returns the element with this ticket (a waiter that timed out), if still queued.
    public mutating func remove(ticket: UInt64) -> Element? {
        guard let index = entries.firstIndex(where: { $0.id == ticket }) else { return nil }
        return entries.remove(at: index).element
    }

    /// Removes and returns every element, oldest first.
    public mutating func removeAll() -> [Element] {
        defer { entries.removeAll() }
        return entries.map(\.element)
    }

    /// Offers each element, oldest first, to `serve`; those it accepts (returns true for) leave.
    public mutating func serve(_ serve: (Element) -> Bool) {
        entries.removeAll { serve($0.element) }
    }
}

extension WaitQueue: Sendable where Element: Sendable {}
