import CSamePortShims
import Glibc

/// The process's Linux capabilities, read and dropped with capget/capset and prctl.
///
/// Capabilities belong to each thread: changes here apply to the calling thread only, so they
/// are made before the process starts any other thread (the daemon does it before Dispatch runs).
public enum Capabilities {
    public enum Capability: Sendable {
        case chown, setpcap

        var number: Int32 {
            switch self {
            case .chown: sameport_cap_chown
            case .setpcap: sameport_cap_setpcap
            }
        }

        var bit: UInt64 { 1 << UInt64(number) }
        public var name: String {
            switch self {
            case .chown: "CAP_CHOWN"
            case .setpcap: "CAP_SETPCAP"
            }
        }
    }

    /// Makes a permitted capability effective (a non-root process with ambient capabilities has
    /// them effective already; this covers one started with them permitted only). True if it is.
    @discardableResult
    public static func raise(_ capability: Capability) -> Bool {
        var caps = sameport_capabilities()
        guard sameport_capget(&caps) == 0, caps.permitted & capability.bit != 0 else { return false }
        if caps.effective & capability.bit != 0 { return true }
        caps.effective |= capability.bit
        return sameport_capset(&caps) == 0
    }

    /// What `drop` did.
    public struct DropReport: Sendable {
        /// The process held the capability in some set before.
        public var held: Bool
        /// It was removed from the bounding set too (that needs CAP_SETPCAP).
        public var droppedFromBoundingSet: Bool
        /// Why something could not be dropped; nil when it is gone from every set.
        public var problem: String?
    }

    /// Removes `capability`, and CAP_SETPCAP with it, from the ambient, bounding (when CAP_SETPCAP
    /// allows it), inheritable, permitted and effective sets of the calling thread. CAP_SETPCAP
    /// goes last, since the bounding-set drop needs it.
    public static func dropWithSetpcap(_ capability: Capability) -> DropReport {
        var caps = sameport_capabilities()
        guard sameport_capget(&caps) == 0 else {
            return DropReport(held: false, droppedFromBoundingSet: false, problem: "capget: \(String(cString: strerror(errno)))")
        }
        let inBounding = sameport_capbset_read(capability.number) == 1
        let inAmbient = sameport_cap_ambient_is_set(capability.number) == 1
        let held = (caps.permitted | caps.effective | caps.inheritable) & capability.bit != 0 || inAmbient
        var problem: String?
        if inAmbient, sameport_cap_ambient_lower(capability.number) != 0 {
            problem = "cannot lower the ambient \(capability.name): \(String(cString: strerror(errno)))"
        }
        var droppedFromBoundingSet = !inBounding
        if inBounding {
            // Needs CAP_SETPCAP effective; without it the bounding set keeps the capability, but
            // with it gone from the permitted set (and NoNewPrivileges=) it cannot come back.
            if caps.permitted & Capability.setpcap.bit != 0 {
                caps.effective |= Capability.setpcap.bit
                _ = sameport_capset(&caps)
                droppedFromBoundingSet = sameport_capbset_drop(capability.number) == 0
                _ = sameport_capbset_drop(Capability.setpcap.number)
            }
        }
        let dropBits = capability.bit | Capability.setpcap.bit
        if sameport_cap_ambient_is_set(Capability.setpcap.number) == 1 {
            _ = sameport_cap_ambient_lower(Capability.setpcap.number)
        }
        _ = sameport_capget(&caps)
        caps.effective &= ~dropBits
        caps.permitted &= ~dropBits
        caps.inheritable &= ~dropBits
        if sameport_capset(&caps) != 0 {
            problem = "capset: \(String(cString: strerror(errno)))"
        }
        return DropReport(held: held, droppedFromBoundingSet: droppedFromBoundingSet, problem: problem)
    }

    /// The number of threads of this process (/proc/self/task), or nil if it cannot be read.
    public static func threadCount() -> Int? {
        guard let directory = opendir("/proc/self/task") else { return nil }
        defer { closedir(directory) }
        var count = 0
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { count += 1 }
        }
        return count
    }
}
