#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Where a setting's value came from, for `uvm config show`.
public enum SettingSource: Sendable, Equatable, CustomStringConvertible {
    case builtIn
    case file(path: String, line: Int)
    case environment(String)

    public var description: String {
        switch self {
        case .builtIn: return "default"
        case .file(let path, let line): return "\(path):\(line)"
        case .environment(let name): return "env \(name)"
        }
    }
}

/// A value that does not parse: the message says what was expected.
public struct SettingValueError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// One user setting: its place in uvm.conf (`[section] name`), its environment variable, how to
/// parse and show it. To add a setting, add a field to `Settings` and a row to `Settings.schema`.
public struct SettingKey: Sendable {
    public var section: String
    public var name: String
    /// The `UVM_*` variable that overrides the file, if any.
    public var env: String?
    public var summary: String
    /// Parses a value as written in uvm.conf and stores it.
    public var parse: @Sendable (String, inout Settings) throws(SettingValueError) -> Void
    /// Parses the environment variable's value when its syntax differs from the file's.
    public var parseEnv: (@Sendable (String, inout Settings) throws(SettingValueError) -> Void)?
    public var show: @Sendable (Settings) -> String

    public init(_ section: String, _ name: String, env: String? = nil, _ summary: String,
                parse: @escaping @Sendable (String, inout Settings) throws(SettingValueError) -> Void,
                parseEnv: (@Sendable (String, inout Settings) throws(SettingValueError) -> Void)? = nil,
                show: @escaping @Sendable (Settings) -> String) {
        self.section = section
        self.name = name
        self.env = env
        self.summary = summary
        self.parse = parse
        self.parseEnv = parseEnv
        self.show = show
    }

    /// "vm.memory": the key of `sources`.
    public var id: String { "\(section).\(name)" }

    /// Applies the environment variable when it is set (an empty value counts as unset).
    public func applyEnvironment(_ env: [String: String], to settings: inout Settings,
                                 sources: inout [String: SettingSource]) throws(SettingValueError) {
        guard let name = self.env, let value = env[name], !value.isEmpty else { return }
        do {
            try (parseEnv ?? parse)(value, &settings)
        } catch {
            throw SettingValueError("\(name)=\(value): \(error.message)")
        }
        sources[id] = .environment(name)
    }
}

extension Settings {
    /// Every setting of uvm.conf, in the order `uvm config show` prints them.
    public static let schema: [SettingKey] = [
        SettingKey("vm", "memory", env: "UVM_MEMORY_MB", "memory of the VM (4GB, 512MB; UVM_MEMORY_MB in MiB)",
                   parse: { v, s throws(SettingValueError) in s.memoryMiB = try parseMemory(v) },
                   parseEnv: { v, s throws(SettingValueError) in
                       guard let n = Int(v), n >= 128 else { throw SettingValueError("expected a number of MiB, at least 128") }
                       s.memoryMiB = n
                   },
                   show: { formatMemory($0.memoryMiB) }),
        SettingKey("vm", "swap", env: "UVM_SWAP", "swap in the VM (1GB, 512MB; 0: none; default: a quarter of memory)",
                   parse: { v, s throws(SettingValueError) in
                       s.swapMiB = v.filter { !$0.isWhitespace } == "0" ? 0 : try parseMemory(v)
                   },
                   show: { s in s.swapMiB == nil ? "\(formatMemory(s.effectiveSwapMiB)) (a quarter of memory)" : s.effectiveSwapMiB == 0 ? "0" : formatMemory(s.effectiveSwapMiB) }),
        SettingKey("vm", "swapFile", env: "UVM_SWAP_FILE", "the sparse file on the host that holds the swap",
                   parse: { v, s throws(SettingValueError) in
                       guard v.hasPrefix("/") else { throw SettingValueError("expected an absolute path") }
                       s.swapFile = v
                   },
                   show: { $0.swapFile ?? "(swap.img in uvm's data folder)" }),
        SettingKey("vm", "autoMemoryReclaim", env: "UVM_AUTO_MEMORY_RECLAIM",
                   "what an idle guest gives back: dropCache (its caches at once), gradual (in steps), disabled",
                   parse: { v, s throws(SettingValueError) in
                       guard let mode = autoMemoryReclaimModes.first(where: { $0.lowercased() == v.lowercased() }) else {
                           throw SettingValueError("expected dropCache, gradual or disabled")
                       }
                       s.autoMemoryReclaim = mode
                   },
                   show: { $0.autoMemoryReclaim }),
        SettingKey("vm", "autoMemoryReclaimDelay", env: "UVM_AUTO_MEMORY_RECLAIM_DELAY",
                   "how long the guest stays idle (<= 0.5% CPU) before it reclaims (2s, 1m)",
                   parse: { v, s throws(SettingValueError) in
                       guard let d = try parseTimeout(v) else { throw SettingValueError("expected a duration such as 30s or 2m (autoMemoryReclaim = disabled turns reclaim off)") }
                       s.autoMemoryReclaimDelay = d
                   },
                   show: { formatTimeout($0.autoMemoryReclaimDelay) }),
        SettingKey("vm", "processors", env: "UVM_CPUS", "virtual CPUs",
                   parse: { v, s throws(SettingValueError) in
                       guard let n = Int(v), n >= 1, n <= 256 else { throw SettingValueError("expected a number of processors from 1 to 256") }
                       s.processors = n
                   },
                   show: { "\($0.processors)" }),
        SettingKey("vm", "kernel", env: "UVM_KERNEL", "guest kernel image (default: the one `make kernel` built)",
                   parse: { v, s throws(SettingValueError) in
                       guard v.hasPrefix("/") else { throw SettingValueError("expected an absolute path") }
                       s.kernel = v
                   },
                   show: { $0.kernel ?? "(built-in)" }),
        SettingKey("vm", "kernelCommandLine", env: "UVM_KERNEL_CMDLINE", "appended to the kernel command line",
                   parse: { v, s in s.kernelCommandLine = v },
                   show: { $0.kernelCommandLine }),
        SettingKey("vm", "firmware", env: "UVM_FIRMWARE",
                   "what the VM starts from: auto (qboot if QEMU has it, else SeaBIOS), seabios, qboot, or a BIOS image's path",
                   parse: { v, s throws(SettingValueError) in
                       guard ["auto", "seabios", "qboot"].contains(v) || v.hasPrefix("/") else {
                           throw SettingValueError("expected auto, seabios, qboot or an absolute path")
                       }
                       s.firmware = v
                   },
                   show: { $0.firmware }),
        SettingKey("vm", "accel", env: "UVM_ACCEL", "auto, kvm or tcg",
                   parse: { v, s throws(SettingValueError) in
                       guard ["auto", "kvm", "tcg"].contains(v) else { throw SettingValueError("expected auto, kvm or tcg") }
                       s.accel = v
                   },
                   show: { $0.accel }),
        SettingKey("vm", "vmIdleTimeout", env: "UVM_VM_IDLE_TIMEOUT", "VM stops this long after its last instance (never: stays)",
                   parse: { v, s throws(SettingValueError) in s.vmIdleTimeout = try parseTimeout(v) },
                   show: { formatTimeout($0.vmIdleTimeout) }),
        SettingKey("vm", "localhostForwarding", env: "UVM_LOCALHOST_FORWARDING", "guest ports on localhost appear on the host's",
                   parse: { v, s throws(SettingValueError) in s.localhostForwarding = try parseBool(v) },
                   show: { "\($0.localhostForwarding)" }),
        SettingKey("vm", "libvirtURI", env: "UVM_LIBVIRT_URI", "libvirt connection",
                   parse: { v, s in s.libvirtURI = v },
                   show: { $0.libvirtURI }),
        SettingKey("general", "instanceIdleTimeout", env: "UVM_INSTANCE_IDLE_TIMEOUT", "an instance stops this long after its last client (never: stays)",
                   parse: { v, s throws(SettingValueError) in s.instanceIdleTimeout = try parseTimeout(v) },
                   show: { formatTimeout($0.instanceIdleTimeout) }),
        SettingKey("general", "defaultDistro", env: "UVM_DEFAULT_DISTRO", "distro of `uvm` and `uvm exec` without --distro",
                   parse: { v, s throws(SettingValueError) in
                       guard validDistroName(v) else { throw SettingValueError("expected a distro name (letters, digits, - _ ., at most 16)") }
                       s.defaultDistro = v
                   },
                   show: { $0.defaultDistro }),
        SettingKey("interop", "enabled", env: "UVM_INTEROP_ENABLED",
                   "`uvm-host CMD` in a session runs CMD on the host as you (off: the guest is untrusted; a distro's /etc/uvm.conf can only turn it off)",
                   parse: { v, s throws(SettingValueError) in s.interopEnabled = try parseBool(v) },
                   show: { "\($0.interopEnabled)" }),
        SettingKey("general", "homeShare", env: "UVM_HOME_SHARE", "host folder every distro sees at /mnt/host/home (true: $HOME, false: none)",
                   parse: { v, s throws(SettingValueError) in
                       switch v.lowercased() {
                       case "false", "off", "no", "0", "none": s.homeShare = nil
                       case "true", "on", "yes", "1": s.homeShare = Settings().homeShare
                       default:
                           guard v.hasPrefix("/") else { throw SettingValueError("expected true, false or an absolute path") }
                           s.homeShare = v
                       }
                   },
                   show: { $0.homeShare ?? "false" }),
    ]
}

/// `[vm] autoMemoryReclaim` values, spelled as WSL does.
public let autoMemoryReclaimModes = ["disabled", "dropCache", "gradual"]

/// WSL's durations: `2s`, `500ms`, `1m`, `1h`, or plain milliseconds. A negative value or `never`
/// disables the timer (nil).
public func parseTimeout(_ text: String) throws(SettingValueError) -> Duration? {
    let v = text.lowercased()
    let bad = SettingValueError("expected a duration such as 500ms, 2s, 1m, plain milliseconds, or never")
    if v == "never" { return nil }
    var digits = Substring(v)
    let negative = digits.hasPrefix("-")
    if negative { digits = digits.dropFirst() }
    let number = digits.prefix { $0.isNumber || $0 == "." }
    let unit = digits.dropFirst(number.count)
    guard !number.isEmpty, let n = Double(number) else { throw bad }
    let ms: Double
    switch unit {
    case "", "ms": ms = n
    case "s": ms = n * 1000
    case "m", "min": ms = n * 60_000
    case "h": ms = n * 3_600_000
    default: throw bad
    }
    if negative { return nil }
    guard ms < 1e12 else { throw bad }
    return .milliseconds(Int64(ms.rounded()))
}

public func formatTimeout(_ d: Duration?) -> String {
    guard let d else { return "never" }
    let ms = d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000
    if ms % 60_000 == 0 && ms > 0 { return "\(ms / 60_000)m" }
    if ms % 1000 == 0 { return "\(ms / 1000)s" }
    return "\(ms)ms"
}

/// WSL's sizes: a number with B, K(B), M(B), G(B) or T(B) (powers of 1024); plain numbers are bytes.
public func parseMemory(_ text: String) throws(SettingValueError) -> Int {
    let v = text.uppercased()
    let number = v.prefix { $0.isNumber }
    let unit = String(v.dropFirst(number.count).filter { !$0.isWhitespace })
    let shift: [String: Int] = ["": 0, "B": 0, "K": 10, "KB": 10, "M": 20, "MB": 20, "G": 30, "GB": 30, "T": 40, "TB": 40]
    guard let n = Int(number), let sh = shift[unit], n < (1 << 20) || sh == 0 else {
        throw SettingValueError("expected a size such as 4GB or 512MB")
    }
    let mib = (n << sh) >> 20
    guard mib >= 128 else { throw SettingValueError("\(text) is too little: the VM needs at least 128MB") }
    return mib
}

public func formatMemory(_ mib: Int) -> String { mib % 1024 == 0 ? "\(mib / 1024)GB" : "\(mib)MB" }

public func parseBool(_ text: String) throws(SettingValueError) -> Bool {
    switch text.lowercased() {
    case "true", "1", "yes", "on": return true
    case "false", "0", "no", "off": return false
    default: throw SettingValueError("expected true or false")
    }
}
