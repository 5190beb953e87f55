import Glibc

/// A distro's /etc/uvm.conf: INI sections of `key = value`, WSL's /etc/wsl.conf keys. Read when
/// the instance starts; a line that is malformed, a key nobody knows or a value of the wrong kind
/// stops the start with the file and line, so that a typo does not pass unnoticed.
struct DistroConfig {
    /// "section.key" (lower case) -> value.
    var values: [String: String] = [:]

    struct LineError: Error, CustomStringConvertible {
        var line: Int
        var message: String
        var description: String { "/etc/uvm.conf line \(line): \(message)" }
    }

    enum Kind { case bool, text, hostname, absolutePath, userName, keepAlive }

    /// WSL's keys. Those marked "no effect" are accepted so that a wsl.conf carried over works,
    /// but uvm has nothing to do for them (no Windows drives, no Windows interop).
    static let known: [String: Kind] = [
        "user.default": .userName,
        "boot.command": .text,
        "boot.systemd": .bool,                    // the distro's systemd as the instance's init
        "boot.keepalive": .keepAlive,             // uvm's: services keep an idle instance running
        "network.hostname": .hostname,
        "network.generatehosts": .bool,
        "network.generateresolvconf": .bool,
        "automount.root": .absolutePath,
        "automount.enabled": .bool,               // no effect: shares are uvm's
        "automount.mountfstab": .bool,            // no effect
        "automount.options": .text,               // no effect
        "interop.enabled": .bool,                 // false: no uvm-host here (the host's [interop] turns it on)
        "interop.appendwindowspath": .bool,       // no effect
        "gpu.enabled": .bool,                     // no effect
        "time.usewindowstimezone": .bool,         // no effect
    ]

    /// Lenient: what can be read, for callers that must not fail (the default user at exec).
    static func parse(_ text: String) -> DistroConfig {
        (try? parse(text, strict: false)) ?? DistroConfig()
    }

    /// Strict: every line must be a section, a known key with a valid value, a comment or empty.
    static func validated(_ text: String) throws(LineError) -> DistroConfig {
        try parse(text, strict: true)
    }

    private static func parse(_ text: String, strict: Bool) throws(LineError) -> DistroConfig {
        var c = DistroConfig()
        var section = ""
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = String(raw).trimmed
            if line.isEmpty || line.hasPrefix("#") || line.hasPrefix(";") { continue }
            if line.hasPrefix("[") {
                guard line.hasSuffix("]") else {
                    if strict { throw LineError(line: i + 1, message: "'\(line)' is not a [section]") }
                    continue
                }
                section = String(line.dropFirst().dropLast()).trimmed.lowercased()
                continue
            }
            guard let eq = line.firstIndex(of: "=") else {
                if strict { throw LineError(line: i + 1, message: "expected key = value, found '\(line)'") }
                continue
            }
            let key = "\(section).\(String(line[..<eq]).trimmed.lowercased())"
            var value = String(line[line.index(after: eq)...]).trimmed
            if value.count >= 2, value.first == "\"", value.last == "\"" { value = String(value.dropFirst().dropLast()) }
            if strict {
                guard let kind = known[key] else {
                    throw LineError(line: i + 1, message: "unknown key '\(key)' (known: \(known.keys.sorted().joined(separator: ", ")))")
                }
                if let problem = check(value, kind) { throw LineError(line: i + 1, message: "\(key) = \(value): \(problem)") }
            }
            c.values[key] = value
        }
        return c
    }

    private static func check(_ v: String, _ kind: Kind) -> String? {
        switch kind {
        case .bool:
            return ["true", "false", "yes", "no", "on", "off", "1", "0"].contains(v.lowercased()) ? nil : "expected true or false"
        case .text:
            return nil
        case .hostname:
            let ok = !v.isEmpty && v.utf8.count <= 64 && v.first != "-" && v.last != "-"
                && v.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == ".") }
            return ok ? nil : "not a host name (letters, digits, '-' and '.', at most 64)"
        case .absolutePath:
            let parts = v.split(separator: "/")
            return v.hasPrefix("/") && v != "/" && !parts.contains("..") && !parts.contains(".") && v.utf8.count < 200
                ? nil : "expected an absolute path other than / (no . or ..)"
        case .keepAlive:
            return ["none", "services"].contains(v.lowercased()) ? nil : "expected none or services"
        case .userName:
            return !v.isEmpty && v.count <= 32 && !v.contains(":") && !v.contains("/") && !v.contains(" ") ? nil : "not a user name"
        }
    }

    func bool(_ section: String, _ key: String) -> Bool? {
        switch values["\(section.lowercased()).\(key.lowercased())"]?.lowercased() {
        case "true", "yes", "on", "1": return true
        case "false", "no", "off", "0": return false
        default: return nil
        }
    }

    var hostname: String? { values["network.hostname"] }
    var bootCommand: String? { values["boot.command"].flatMap { $0.isEmpty ? nil : $0 } }
    var sharesRoot: String { values["automount.root"] ?? "/mnt/host" }
    /// `[boot] keepAlive = services`: the idle reaper leaves the instance running while it runs
    /// services of its own or listens on a port (WSL stops it regardless: microsoft/WSL #8854).
    var keepAliveServices: Bool { values["boot.keepalive"]?.lowercased() == "services" }
}
