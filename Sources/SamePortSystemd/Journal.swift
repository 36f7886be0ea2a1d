import Glibc

/// journald's stream connection (systemd.exec(5), JOURNAL_STREAM).
public enum Journal {
    /// True when stderr is the journal stream systemd connected: JOURNAL_STREAM holds the
    /// `device:inode` of that stream, and it must match stderr (a child whose stderr was
    /// redirected inherits the variable but not the stream).
    public static var isStderrJournal: Bool {
        guard let value = getenv("JOURNAL_STREAM").map({ String(cString: $0) }) else { return false }
        let parts = value.split(separator: ":")
        guard parts.count == 2, let device = UInt64(parts[0]), let inode = UInt64(parts[1]) else { return false }
        var info = stat()
        guard fstat(2, &info) == 0 else { return false }
        return UInt64(info.st_dev) == device && UInt64(info.st_ino) == inode
    }
}
