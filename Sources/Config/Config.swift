import CGLib
import Foundation
import Settings

/// A setting that cannot be used: names the file, line and key so the user can fix it.
public struct ConfigError: Error, Sendable, Equatable, CustomStringConvertible {
    public var file: String
    public var line: Int?
    public var key: String?
    public var message: String

    public init(file: String, line: Int?, key: String?, message: String) {
        self.file = file
        self.line = line
        self.key = key
        self.message = message
    }

    public var description: String {
        var s = file
        if let line { s += ":\(line)" }
        s += ": "
        if let key { s += "\(key): " }
        return s + message
    }
}

/// The settings in effect and where each came from.
public struct LoadedSettings: Sendable {
    public var settings: Settings
    /// By `SettingKey.id` ("vm.memory"); keys not listed have their default.
    public var sources: [String: SettingSource]
    public var file: String
    public var fileExists: Bool

    public func source(of key: SettingKey) -> SettingSource { sources[key.id] ?? .builtIn }
}

public enum Config {
    /// Defaults, then uvm.conf (`Paths.configFile`: $UVM_CONFIG, else $XDG_CONFIG_HOME/uvm/uvm.conf),
    /// then `UVM_*` variables. A file that is missing is fine, unless UVM_CONFIG names it.
    public static func load(paths: Paths = .current(),
                            env: [String: String] = ProcessInfo.processInfo.environment) throws(ConfigError) -> LoadedSettings {
        var settings = Settings()
        var sources: [String: SettingSource] = [:]
        let file = paths.configFile
        let exists = FileManager.default.fileExists(atPath: file)
        if exists {
            try apply(file: file, to: &settings, sources: &sources)
        } else if let named = env["UVM_CONFIG"], !named.isEmpty {
            throw ConfigError(file: named, line: nil, key: nil, message: "no such file (named by UVM_CONFIG)")
        }
        for key in Settings.schema {
            do {
                try key.applyEnvironment(env, to: &settings, sources: &sources)
            } catch {
                throw ConfigError(file: "environment", line: nil, key: key.env, message: error.message)
            }
        }
        settings.defaultDistroIsExplicit = sources["general.defaultDistro"] != nil
        return LoadedSettings(settings: settings, sources: sources, file: file, fileExists: exists)
    }

    /// Parses `file` with GLib's GKeyFile (the INI dialect of WSL's .wslconfig) and applies every
    /// key; unknown sections and keys are errors, so that a typo does not go unnoticed.
    public static func apply(file: String, to settings: inout Settings, sources: inout [String: SettingSource]) throws(ConfigError) {
        let text = (try? String(contentsOfFile: file, encoding: .utf8)) ?? ""
        let lines = KeyFileLines(text)
        let entries: [KeyFileEntry]
        do {
            entries = try readKeyFile(file)
        } catch {
            throw ConfigError(file: file, line: lines.firstMalformedLine(), key: nil, message: error.message)
        }
        for e in entries {
            let line = lines.line(ofKey: e.key, inGroup: e.group)
            // WSL's keys are case-insensitive; so are ours.
            guard let key = Settings.schema.first(where: {
                $0.section.lowercased() == e.group.lowercased() && $0.name.lowercased() == e.key.lowercased()
            }) else {
                let inSection = Settings.schema.filter { $0.section.lowercased() == e.group.lowercased() }
                let known = inSection.isEmpty
                    ? "unknown section [\(e.group)] (known: \(Set(Settings.schema.map { "[\($0.section)]" }).sorted().joined(separator: ", ")))"
                    : "unknown key (known in [\(e.group)]: \(inSection.map(\.name).joined(separator: ", ")))"
                throw ConfigError(file: file, line: line, key: "[\(e.group)] \(e.key)", message: known)
            }
            do throws(SettingValueError) {
                try key.parse(unquote(e.value), &settings)
            } catch {
                throw ConfigError(file: file, line: line, key: "[\(key.section)] \(key.name)",
                                  message: "bad value '\(e.value)': \(error.message)")
            }
            sources[key.id] = .file(path: file, line: line ?? 0)
        }
    }

    /// `"a b"` -> `a b`: WSL accepts quoted values; GKeyFile keeps the quotes.
    static func unquote(_ v: String) -> String {
        v.count >= 2 && v.hasPrefix("\"") && v.hasSuffix("\"") ? String(v.dropFirst().dropLast()) : v
    }

    /// The text `uvm config show` prints: every setting, its value and where it came from.
    public static func describe(_ loaded: LoadedSettings) -> String {
        var out = "# \(loaded.file)\(loaded.fileExists ? "" : " (not present: defaults)")\n"
        var section = ""
        let width = Settings.schema.map { $0.name.count + 3 + $0.show(loaded.settings).count }.max() ?? 0
        for key in Settings.schema {
            if key.section != section {
                if !section.isEmpty { out += "\n" }
                section = key.section
                out += "[\(section)]\n"
            }
            let assignment = "\(key.name) = \(key.show(loaded.settings))"
            out += assignment.padding(toLength: max(width, assignment.count), withPad: " ", startingAt: 0)
            out += "  # \(loaded.source(of: key))\n"
        }
        return out
    }

    /// The same for `--format json`.
    public struct Report: Codable, Sendable {
        public struct Row: Codable, Sendable {
            public var section: String
            public var key: String
            public var value: String
            public var source: String
            public var env: String?
        }
        public var file: String
        public var fileExists: Bool
        public var settings: [Row]
    }

    public static func report(_ loaded: LoadedSettings) -> Report {
        Report(file: loaded.file, fileExists: loaded.fileExists, settings: Settings.schema.map {
            Report.Row(section: $0.section, key: $0.name, value: $0.show(loaded.settings), source: "\(loaded.source(of: $0))", env: $0.env)
        })
    }
}

struct KeyFileEntry { var group: String; var key: String; var value: String }

struct KeyFileReadError: Error { var message: String }

/// Every group/key/value of an INI file through GKeyFile.
func readKeyFile(_ path: String) throws(KeyFileReadError) -> [KeyFileEntry] {
    guard let kf = g_key_file_new() else { throw KeyFileReadError(message: "out of memory") }
    defer { g_key_file_free(kf) }
    var error: UnsafeMutablePointer<GError>? = nil
    func take(_ error: inout UnsafeMutablePointer<GError>?) -> KeyFileReadError {
        defer { g_error_free(error); error = nil }
        return KeyFileReadError(message: error.map { String(cString: $0.pointee.message) } ?? "unreadable")
    }
    guard g_key_file_load_from_file(kf, path, G_KEY_FILE_NONE, &error) != 0 else { throw take(&error) }
    var entries: [KeyFileEntry] = []
    var ngroups: gsize = 0
    guard let groups = g_key_file_get_groups(kf, &ngroups) else { return [] }
    defer { g_strfreev(groups) }
    for gi in 0..<Int(ngroups) {
        guard let group = groups[gi] else { continue }
        var nkeys: gsize = 0
        guard let keys = g_key_file_get_keys(kf, group, &nkeys, &error) else { throw take(&error) }
        defer { g_strfreev(keys) }
        for ki in 0..<Int(nkeys) {
            guard let key = keys[ki] else { continue }
            // The raw value: GKeyFile's string escapes (\s, \n) mean nothing in WSL's format.
            guard let value = g_key_file_get_value(kf, group, key, &error) else { throw take(&error) }
            defer { g_free(value) }
            entries.append(KeyFileEntry(group: String(cString: group), key: String(cString: key), value: String(cString: value)))
        }
    }
    return entries
}

/// GKeyFile does not report line numbers: find them in the text, for error messages.
struct KeyFileLines {
    let lines: [Substring]
    init(_ text: String) { lines = text.split(separator: "\n", omittingEmptySubsequences: false) }

    static func trim(_ s: Substring) -> Substring {
        var s = s
        while let c = s.first, c.isWhitespace { s.removeFirst() }
        while let c = s.last, c.isWhitespace { s.removeLast() }
        return s
    }

    /// The last line setting `key` in `[group]` (GKeyFile keeps the last one).
    func line(ofKey key: String, inGroup group: String) -> Int? {
        var current = ""
        var found: Int? = nil
        for (i, raw) in lines.enumerated() {
            let l = Self.trim(raw)
            if l.hasPrefix("[") && l.hasSuffix("]") { current = String(l.dropFirst().dropLast()); continue }
            guard current == group, let eq = l.firstIndex(of: "=") else { continue }
            if Self.trim(l[..<eq]) == key { found = i + 1 }
        }
        return found
    }

    /// The first line GKeyFile cannot read: neither blank, comment, [group] nor key=value, or a
    /// key before any group.
    func firstMalformedLine() -> Int? {
        var inGroup = false
        for (i, raw) in lines.enumerated() {
            let l = Self.trim(raw)
            if l.isEmpty || l.hasPrefix("#") { continue }
            if l.hasPrefix("[") {
                if !l.hasSuffix("]") { return i + 1 }
                inGroup = true
                continue
            }
            guard inGroup, let eq = l.firstIndex(of: "="), !Self.trim(l[..<eq]).isEmpty else { return i + 1 }
        }
        return nil
    }
}
