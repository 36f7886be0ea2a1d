import SamePortConfig

/// The problems of a configuration text, as the lines a user sees, or [] when it is valid.
func problems(_ text: String) -> [String] {
    do {
        _ = try Configuration(text: text, path: "f.toml")
        return []
    } catch {
        return error.problems.map(\.description)
    }
}
