import SamePortCore
import Testing

/// An endpoint from `IP:PORT` or `[IPv6]:PORT` text.
private func ep(_ text: String) throws -> Endpoint {
    try #require(try HostPort(parsing: text).endpoint)
}

/// The reservation inside `outcome`, or a test failure.
private func reservation(
    _ outcome: UpstreamSelector.Outcome, sourceLocation: SourceLocation = #_sourceLocation
) throws -> UpstreamSelector.Reservation {
    guard case .reserved(let reservation) = outcome else {
        Issue.record("expected a reservation, got \(outcome)", sourceLocation: sourceLocation)
        throw ReservationMissing()
    }
    return reservation
}

private struct ReservationMissing: Error {}

@Suite("UpstreamSelector")
struct UpstreamSelectorTests {
    @Test("one upstream, one fixed egress: booked once, freed by release")
    func oneUpstream() throws {
        let upstream = try ep("127.0.0.1:8000")
        let egress = try ep("127.0.0.1:7000")
        var selector = UpstreamSelector(upstreams: [[upstream]])
        #expect(selector.pairsInUse == 0)

        let first = try reservation(selector.reserve(egress: egress, isIPv6: false))
        #expect(first.upstreamIndex == 0)
        #expect(first.egress == egress)
        #expect(first.addresses == [upstream])
        #expect(selector.pairsInUse == 1)

        // The same 4-tuple cannot be used twice.
        #expect(selector.reserve(egress: egress, isIPv6: false) == .busy)
        #expect(selector.pairsInUse == 1)

        // Another egress port makes a different 4-tuple.
        let otherEgress = try ep("127.0.0.1:7001")
        let second = try reservation(selector.reserve(egress: otherEgress, isIPv6: false))
        #expect(second.upstreamIndex == 0)
        #expect(second.egress == otherEgress)
        #expect(selector.pairsInUse == 2)

        // Another egress IP with the same port too.
        let thirdEgress = try ep("127.0.0.2:7000")
        _ = try reservation(selector.reserve(egress: thirdEgress, isIPv6: false))
        #expect(selector.pairsInUse == 3)

        selector.release(first)
        #expect(selector.pairsInUse == 2)
        let again = try reservation(selector.reserve(egress: egress, isIPv6: false))
        #expect(again == first)
        #expect(selector.pairsInUse == 3)
        // Still busy from the other egresses.
        #expect(selector.reserve(egress: otherEgress, isIPv6: false) == .busy)
        #expect(selector.reserve(egress: thirdEgress, isIPv6: false) == .busy)
    }

    @Test("two upstreams: both booked from one egress, then busy; release frees the right one")
    func twoUpstreams() throws {
        let a = try ep("127.0.0.1:8001")
        let b = try ep("127.0.0.1:8002")
        let egress = try ep("127.0.0.1:7000")
        var selector = UpstreamSelector(upstreams: [[a], [b]])

        let first = try reservation(selector.reserve(egress: egress, isIPv6: false))
        let second = try reservation(selector.reserve(egress: egress, isIPv6: false))
        #expect(first.upstreamIndex == 0)
        #expect(first.addresses == [a])
        #expect(second.upstreamIndex == 1)
        #expect(second.addresses == [b])
        #expect(selector.pairsInUse == 2)
        #expect(selector.reserve(egress: egress, isIPv6: false) == .busy)

        // Freeing the first upstream makes exactly it available again.
        selector.release(first)
        let third = try reservation(selector.reserve(egress: egress, isIPv6: false))
        #expect(third.upstreamIndex == 0)
        #expect(selector.reserve(egress: egress, isIPv6: false) == .busy)

        selector.release(second)
        let fourth = try reservation(selector.reserve(egress: egress, isIPv6: false))
        #expect(fourth.upstreamIndex == 1)
    }

    @Test("round-robin spreads connections over the upstreams")
    func roundRobin() throws {
        var selector = UpstreamSelector(upstreams: [[try ep("10.0.0.1:80")], [try ep("10.0.0.2:80")], [try ep("10.0.0.3:80")]])
        var indices: [Int] = []
        for port in UInt16(7000)..<7007 {
            let egress = Endpoint(.loopbackV4, port)
            indices.append(try reservation(selector.reserve(egress: egress, isIPv6: false)).upstreamIndex)
        }
        #expect(indices == [0, 1, 2, 0, 1, 2, 0])

        // With a kernel-chosen port too.
        var kernel = UpstreamSelector(upstreams: [[try ep("10.0.0.1:80")], [try ep("10.0.0.2:80")]])
        var kernelIndices: [Int] = []
        for _ in 0..<5 {
            kernelIndices.append(try reservation(kernel.reserve(egress: nil, isIPv6: false)).upstreamIndex)
        }
        #expect(kernelIndices == [0, 1, 0, 1, 0])
    }

    @Test("a busy upstream is skipped, and the cursor moves past the one handed out")
    func skipsBusy() throws {
        let a = try ep("10.0.0.1:80")
        let b = try ep("10.0.0.2:80")
        let e1 = try ep("127.0.0.1:7001")
        let e2 = try ep("127.0.0.1:7002")
        var selector = UpstreamSelector(upstreams: [[a], [b]])
        let r0 = try reservation(selector.reserve(egress: e1, isIPv6: false))  // a from e1; cursor -> 1
        #expect(r0.upstreamIndex == 0)
        let r1 = try reservation(selector.reserve(egress: e2, isIPv6: false))  // b from e2; cursor -> 0
        #expect(r1.upstreamIndex == 1)
        // From e1, a (at the cursor) is busy: b is handed out instead.
        let r2 = try reservation(selector.reserve(egress: e1, isIPv6: false))
        #expect(r2.upstreamIndex == 1)
        #expect(r2.addresses == [b])
        #expect(selector.reserve(egress: e1, isIPv6: false) == .busy)
        // From e2, only a is left.
        let r3 = try reservation(selector.reserve(egress: e2, isIPv6: false))
        #expect(r3.upstreamIndex == 0)
        #expect(selector.reserve(egress: e2, isIPv6: false) == .busy)
        #expect(selector.pairsInUse == 4)
    }

    @Test("only addresses of the egress's family are used")
    func familyFiltering() throws {
        let v6Only = UpstreamSelector(upstreams: [[try ep("[::1]:8000")], [try ep("[2001:db8::1]:8000")]])
        var selector = v6Only
        #expect(selector.reserve(egress: try ep("127.0.0.1:7000"), isIPv6: false) == .noAddressOfFamily)
        #expect(selector.reserve(egress: nil, isIPv6: false) == .noAddressOfFamily)
        #expect(selector.pairsInUse == 0)
        let v6 = try reservation(selector.reserve(egress: try ep("[::1]:7000"), isIPv6: true))
        #expect(v6.addresses == [try ep("[::1]:8000")])

        var v4Only = UpstreamSelector(upstreams: [[try ep("127.0.0.1:8000")]])
        #expect(v4Only.reserve(egress: try ep("[::1]:7000"), isIPv6: true) == .noAddressOfFamily)

        // An upstream with both families contributes only the matching addresses.
        let mixed = [try ep("[::1]:8000"), try ep("127.0.0.1:8000"), try ep("[::2]:8000"), try ep("127.0.0.2:8000")]
        var dual = UpstreamSelector(upstreams: [mixed])
        let v4 = try reservation(dual.reserve(egress: try ep("127.0.0.1:7000"), isIPv6: false))
        #expect(v4.addresses == [try ep("127.0.0.1:8000"), try ep("127.0.0.2:8000")])
        #expect(dual.pairsInUse == 2)
        let v6Mixed = try reservation(dual.reserve(egress: try ep("[::1]:7000"), isIPv6: true))
        #expect(v6Mixed.addresses == [try ep("[::1]:8000"), try ep("[::2]:8000")])
        #expect(dual.pairsInUse == 4)

        // Upstreams of the wrong family are skipped; busy is reported once the right ones are taken.
        var partial = UpstreamSelector(upstreams: [[try ep("[::1]:8000")], [try ep("127.0.0.1:8000")]])
        let egress = try ep("127.0.0.1:7000")
        let only = try reservation(partial.reserve(egress: egress, isIPv6: false))
        #expect(only.upstreamIndex == 1)
        #expect(partial.reserve(egress: egress, isIPv6: false) == .busy)
    }

    @Test("no upstreams at all")
    func empty() {
        var selector = UpstreamSelector(upstreams: [])
        #expect(selector.reserve(egress: Endpoint(.loopbackV4, 7000), isIPv6: false) == .noAddressOfFamily)
        var unresolved = UpstreamSelector(upstreams: [[], []])
        #expect(unresolved.reserve(egress: nil, isIPv6: false) == .noAddressOfFamily)
    }

    @Test("a host with two addresses books both at once")
    func twoAddresses() throws {
        let a1 = try ep("10.0.0.1:80")
        let a2 = try ep("10.0.0.2:80")
        let egress = try ep("127.0.0.1:7000")
        var selector = UpstreamSelector(upstreams: [[a1, a2]])
        let booked = try reservation(selector.reserve(egress: egress, isIPv6: false))
        #expect(booked.addresses == [a1, a2])
        #expect(selector.pairsInUse == 2)
        #expect(selector.reserve(egress: egress, isIPv6: false) == .busy)

        // An upstream that shares one of those addresses is blocked too.
        var overlap = UpstreamSelector(upstreams: [[a1, a2], [a2]])
        _ = try reservation(overlap.reserve(egress: egress, isIPv6: false))
        #expect(overlap.reserve(egress: egress, isIPv6: false) == .busy)

        selector.release(booked)
        #expect(selector.pairsInUse == 0)
    }

    @Test("two upstream entries resolving to the same address exclude each other")
    func sameAddressTwice() throws {
        let address = try ep("10.0.0.1:80")
        let egress = try ep("127.0.0.1:7000")
        var selector = UpstreamSelector(upstreams: [[address], [address]])
        let first = try reservation(selector.reserve(egress: egress, isIPv6: false))
        #expect(first.upstreamIndex == 0)
        #expect(selector.reserve(egress: egress, isIPv6: false) == .busy)
        #expect(selector.pairsInUse == 1)
        selector.release(first)
        #expect(selector.pairsInUse == 0)
        // Freed: either entry can now be handed out, but still only one at a time.
        _ = try reservation(selector.reserve(egress: egress, isIPv6: false))
        #expect(selector.reserve(egress: egress, isIPv6: false) == .busy)
    }

    @Test("a kernel-chosen egress port is never busy and books nothing")
    func nilEgress() throws {
        let upstream = try ep("127.0.0.1:8000")
        var selector = UpstreamSelector(upstreams: [[upstream]])
        var reservations: [UpstreamSelector.Reservation] = []
        for _ in 0..<10 {
            let booked = try reservation(selector.reserve(egress: nil, isIPv6: false))
            #expect(booked.egress == nil)
            #expect(booked.addresses == [upstream])
            reservations.append(booked)
        }
        #expect(selector.pairsInUse == 0)
        // A fixed egress is unaffected by them.
        let fixed = try reservation(selector.reserve(egress: try ep("127.0.0.1:7000"), isIPv6: false))
        #expect(selector.pairsInUse == 1)
        // Releasing a nil-egress reservation frees nothing.
        for booked in reservations {
            selector.release(booked)
        }
        #expect(selector.pairsInUse == 1)
        #expect(selector.reserve(egress: try ep("127.0.0.1:7000"), isIPv6: false) == .busy)
        selector.release(fixed)
        #expect(selector.pairsInUse == 0)
    }

    @Test("IPv4-mapped egress and upstreams count as plain IPv4")
    func mappedAddresses() throws {
        let mappedUpstream = try ep("[::ffff:10.0.0.1]:80")
        let plainUpstream = try ep("10.0.0.1:80")
        let mappedEgress = try ep("[::ffff:127.0.0.1]:7000")
        let plainEgress = try ep("127.0.0.1:7000")

        var selector = UpstreamSelector(upstreams: [[mappedUpstream]])
        #expect(selector.upstreams == [[plainUpstream]])

        let booked = try reservation(selector.reserve(egress: mappedEgress, isIPv6: false))
        #expect(booked.egress == plainEgress)
        #expect(booked.addresses == [plainUpstream])
        #expect(selector.pairsInUse == 1)
        // The plain spelling of the same egress is the same 4-tuple.
        #expect(selector.reserve(egress: plainEgress, isIPv6: false) == .busy)
        #expect(selector.reserve(egress: mappedEgress, isIPv6: false) == .busy)
        #expect(selector.pairsInUse == 1)

        // Plain and mapped spellings of one upstream address exclude each other.
        var both = UpstreamSelector(upstreams: [[plainUpstream], [mappedUpstream]])
        _ = try reservation(both.reserve(egress: plainEgress, isIPv6: false))
        #expect(both.reserve(egress: mappedEgress, isIPv6: false) == .busy)
        #expect(both.pairsInUse == 1)

        selector.release(booked)
        #expect(selector.pairsInUse == 0)
        _ = try reservation(selector.reserve(egress: plainEgress, isIPv6: false))
        #expect(selector.pairsInUse == 1)
    }

    @Test("an upstream marked down is passed over until its time is up")
    func markedDown() throws {
        let egress = try ep("127.0.0.1:7000")
        var selector = UpstreamSelector(upstreams: [[try ep("127.0.0.1:9001")], [try ep("127.0.0.1:9002")]])
        selector.markDown(0, until: 1_000)
        // While down, only the other one is handed out, round after round.
        for _ in 0..<3 {
            let booked = try reservation(selector.reserve(egress: egress, isIPv6: false, now: 500))
            #expect(booked.upstreamIndex == 1)
            selector.release(booked)
        }
        // A healthy upstream that is only busy is waited for rather than the down one tried.
        let held = try reservation(selector.reserve(egress: egress, isIPv6: false, now: 500))
        #expect(selector.reserve(egress: egress, isIPv6: false, now: 500) == .busy)
        // The down one is tried when it is the only candidate left.
        let last = try reservation(selector.reserve(egress: egress, isIPv6: false, excluding: [1], now: 500))
        #expect(last.upstreamIndex == 0)
        selector.release(last)
        selector.release(held)
        // After its time, it is back in the rotation.
        let indices = try (0..<2).map { _ in
            let booked = try reservation(selector.reserve(egress: egress, isIPv6: false, now: 2_000))
            selector.release(booked)
            return booked.upstreamIndex
        }
        #expect(Set(indices) == [0, 1])
    }
}
