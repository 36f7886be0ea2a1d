import SamePortCore
import Testing

extension WaitQueue {
    /// Appends `element`, failing the test if the queue refuses it.
    fileprivate mutating func enqueue(_ element: Element, sourceLocation: SourceLocation = #_sourceLocation) throws -> UInt64 {
        let ticket = append(element)
        return try #require(ticket, "the queue refused an element", sourceLocation: sourceLocation)
    }
}

@Suite("WaitQueue")
struct WaitQueueTests {
    @Test("a new queue is empty")
    func empty() {
        var queue = WaitQueue<String>(limit: 3)
        #expect(queue.limit == 3)
        #expect(queue.count == 0)
        #expect(queue.isEmpty)
        #expect(!queue.isFull)
        #expect(queue.removeAll() == [])
        var offered: [String] = []
        queue.serve { offered.append($0); return true }
        #expect(offered == [])
    }

    @Test("serve offers elements oldest first")
    func fifo() throws {
        var queue = WaitQueue<Int>(limit: 10)
        for value in [3, 1, 4, 1, 5] {
            _ = try queue.enqueue(value)
        }
        #expect(queue.count == 5)
        #expect(!queue.isEmpty)
        var offered: [Int] = []
        queue.serve { offered.append($0); return true }
        #expect(offered == [3, 1, 4, 1, 5])
        #expect(queue.isEmpty)
        #expect(queue.count == 0)
    }

    @Test("serve that accepts only some keeps the others in order")
    func partialServe() throws {
        var queue = WaitQueue<Int>(limit: 10)
        for value in 1...7 {
            _ = try queue.enqueue(value)
        }
        var offered: [Int] = []
        queue.serve { value in
            offered.append(value)
            return value.isMultiple(of: 2)
        }
        #expect(offered == [1, 2, 3, 4, 5, 6, 7])
        #expect(queue.count == 4)

        // A serve that accepts nothing leaves everything in place.
        offered = []
        queue.serve { offered.append($0); return false }
        #expect(offered == [1, 3, 5, 7])
        #expect(queue.count == 4)

        // Accepting the first two only (as when two upstreams free up).
        var budget = 2
        queue.serve { _ in
            guard budget > 0 else { return false }
            budget -= 1
            return true
        }
        #expect(queue.removeAll() == [5, 7])
    }

    @Test("new arrivals queue behind the ones left by a serve")
    func appendAfterServe() throws {
        var queue = WaitQueue<String>(limit: 4)
        _ = try queue.enqueue("a")
        _ = try queue.enqueue("b")
        queue.serve { $0 == "a" }
        _ = try queue.enqueue("c")
        #expect(queue.removeAll() == ["b", "c"])
    }

    @Test("append refuses elements beyond the limit")
    func limit() throws {
        var queue = WaitQueue<String>(limit: 2)
        let first = try queue.enqueue("a")
        #expect(!queue.isFull)
        let second = try queue.enqueue("b")
        #expect(first != second)
        #expect(queue.isFull)
        #expect(queue.append("c") == nil)
        #expect(queue.count == 2)
        #expect(queue.isFull)

        // Room frees up when an element leaves.
        #expect(queue.remove(ticket: first) == "a")
        #expect(!queue.isFull)
        let third = try queue.enqueue("d")
        #expect(third != first && third != second)
        #expect(queue.isFull)
        #expect(queue.removeAll() == ["b", "d"])
        #expect(!queue.isFull)
        #expect(queue.append("e") != nil)
    }

    @Test("a queue with limit 0 is always full")
    func limitZero() {
        var queue = WaitQueue<Int>(limit: 0)
        #expect(queue.isFull)
        #expect(queue.isEmpty)
        #expect(queue.append(1) == nil)
        #expect(queue.count == 0)
    }

    @Test("remove(ticket:) takes out one element and keeps the rest in order")
    func removeMiddle() throws {
        var queue = WaitQueue<String>(limit: 5)
        let a = try queue.enqueue("a")
        let b = try queue.enqueue("b")
        let c = try queue.enqueue("c")
        #expect(Set([a, b, c]).count == 3)

        #expect(queue.remove(ticket: b) == "b")
        #expect(queue.count == 2)
        // A ticket works once.
        #expect(queue.remove(ticket: b) == nil)
        // Unknown tickets change nothing.
        #expect(queue.remove(ticket: 999) == nil)
        #expect(queue.count == 2)

        var offered: [String] = []
        queue.serve { offered.append($0); return false }
        #expect(offered == ["a", "c"])

        // A served element's ticket no longer removes anything.
        queue.serve { $0 == "a" }
        #expect(queue.remove(ticket: a) == nil)
        #expect(queue.remove(ticket: c) == "c")
        #expect(queue.isEmpty)
    }

    @Test("tickets are not reused after removal")
    func ticketsUnique() throws {
        var queue = WaitQueue<Int>(limit: 1)
        var tickets: Set<UInt64> = []
        for value in 0..<20 {
            let ticket = try queue.enqueue(value)
            tickets.insert(ticket)
            #expect(queue.remove(ticket: ticket) == value)
        }
        #expect(tickets.count == 20)
    }

    @Test("removeAll returns every element oldest first and empties the queue")
    func removeAll() throws {
        var queue = WaitQueue<Int>(limit: 10)
        for value in [9, 8, 7, 6] {
            _ = try queue.enqueue(value)
        }
        #expect(queue.removeAll() == [9, 8, 7, 6])
        #expect(queue.isEmpty)
        #expect(queue.count == 0)
        #expect(queue.removeAll() == [])
    }
}
