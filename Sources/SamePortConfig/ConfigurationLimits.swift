/// What a configuration file may hold. A configuration file is user input: every bound here is
/// checked before the TOML parser sees the text (toml++ recurses on nesting and keeps every table
/// in memory), each with a message that names the limit and the fix.
///
/// The bounds are far above what a real file needs: the deepest nesting sameport reads is 3
/// (`relay = [{ upstream = ["..."] }]`), its longest key has 15 characters, and a relay's name is
/// also its systemd `FileDescriptorName=` (at most 255 characters).
public enum ConfigurationLimits {
    /// The largest file, in bytes: 4 MiB (10,000 relays at about 400 bytes each).
    public static let fileSize = 4 << 20
    /// The deepest nesting of `[` and `{` in a value, and the most parts of a dotted key.
    public static let nesting = 16
    /// The longest key (one part of a dotted key), in characters.
    public static let keyLength = 128
    /// The most relays one file (and so one process) can have.
    public static let relays = 10_000
    /// The most tables of any kind: the relays, `[defaults]`, and some room for mistakes that are
    /// then reported one by one.
    public static let tables = relays + 100
}
