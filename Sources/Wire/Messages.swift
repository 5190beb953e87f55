import NIOCore
#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

public struct ExecRequest: Codable, Sendable, Equatable {
    public var argv: [String]
    /// KEY=VALUE entries added to (or replacing) the guest's defaults.
    public var env: [String]
    /// Working directory in the guest; nil: the user's home.
    public var cwd: String?
    /// User name or numeric uid in the distro; nil: the distro's default user.
    public var user: String?
    /// Distro name; nil: the default distro.
    public var distro: String?
    /// Run on a pty (interactive shells) rather than pipes.
    public var tty: Bool
    public var rows: UInt16?
    public var cols: UInt16?
    /// Run the user's login shell instead of argv (`uvm`, `uvm shell`).
    public var shell: Bool?
    /// The caller's working directory on the host (CLI -> uvmd): inside a share, the process
    /// starts in the matching guest path.
    public var hostCwd: String?
    /// `cwd` was derived from `hostCwd`, not asked for: where the user may not enter it, the
    /// process starts in the home directory instead of failing.
    public var cwdIsImplicit: Bool?
    /// Start the distro's instance (if it is not running) with the defaults instead of its
    /// /etc/uvm.conf: the way to repair a file that keeps it from starting.
    public var ignoreDistroConfig: Bool?
    /// `UVM_TRACE=1`: the exit status carries where the session's time went (`ExitStatus.trace`).
    public var trace: Bool?
    /// uvmd -> agent: `uvm-host` in this session may run host programs ([interop] enabled).
    public var interop: Bool?
    /// CLI -> uvmd only (uvmd removes it before the guest sees it): the caller's environment,
    /// which host programs run by `uvm-host` get (DISPLAY and the like, for xdg-open).
    public var hostEnv: [String]?

    public init(argv: [String], env: [String] = [], cwd: String? = nil, user: String? = nil,
                distro: String? = nil, tty: Bool = false, rows: UInt16? = nil, cols: UInt16? = nil) {
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.user = user
        self.distro = distro
        self.tty = tty
        self.rows = rows
        self.cols = cols
    }
}

/// How a process ended.
public struct ExitStatus: Codable, Sendable, Equatable {
    public var code: Int32?
    public var signal: Int32?
    /// Asked for by `ExecRequest.trace`: seconds per hop, named `guest.*` by the agent's clock and
    /// `uvmd.*` by uvmd's (see `SessionTrace`).
    public var trace: [String: Double]?
    public init(code: Int32? = nil, signal: Int32? = nil) {
        self.code = code
        self.signal = signal
    }
    /// The shell's convention: the exit code, or 128+N for death by signal N.
    public var shellStatus: Int32 { code ?? (128 + (signal ?? 0)) }
    /// A waitpid() status, decoded as the shell reports it.
    public init(waitStatus st: Int32) {
        let sig = st & 0x7f
        self.init(code: sig == 0 ? (st >> 8) & 0xff : nil, signal: sig == 0 ? nil : sig)
    }
}

/// An error meant for the user: one line saying what is wrong and what to do.
public struct WireError: Codable, Sendable, Equatable, Error, CustomStringConvertible {
    public enum Code: String, Codable, Sendable {
        case badRequest, notFound, vmUnavailable, vmStopped, spawnFailed, internalError, protocolError, permissionDenied
        /// The peers come from different uvm builds (`WireVersion`).
        case versionMismatch
    }
    public var code: Code
    public var message: String
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }
    public var description: String { message }
}

/// What the guest agent says about itself (the `info` operation).
public struct GuestInfo: Codable, Sendable, Equatable {
    public var kernelRelease: String
    public var uptimeSeconds: Double
    public var memTotalKiB: UInt64
    public var memAvailableKiB: UInt64
    public var instances: [String]
    /// `WireVersion.current` of the agent; nil from an agent that predates versioning.
    public var protocolVersion: Int?
    /// /proc/meminfo's page cache (Cached) and swap, when the agent reports them.
    public var memCachedKiB: UInt64?
    public var swapTotalKiB: UInt64?
    public var swapFreeKiB: UInt64?
    /// The memory policy in force and the last reclaim it made.
    public var memoryReclaim: MemoryReclaimMode?
    public var lastReclaim: ReclaimRecord?
    /// The guest's uptime when its PID 1 (/init) started: the kernel's own share of a boot.
    public var initStartedSeconds: Double?
    public init(kernelRelease: String, uptimeSeconds: Double, memTotalKiB: UInt64, memAvailableKiB: UInt64, instances: [String],
                protocolVersion: Int? = WireVersion.current) {
        self.protocolVersion = protocolVersion
        self.kernelRelease = kernelRelease
        self.uptimeSeconds = uptimeSeconds
        self.memTotalKiB = memTotalKiB
        self.memAvailableKiB = memAvailableKiB
        self.instances = instances
    }
}

/// One reclaim made by the guest's memory policy.
public struct ReclaimRecord: Codable, Sendable, Equatable {
    public var mode: MemoryReclaimMode
    /// Guest uptime when it finished.
    public var atUptimeSeconds: Double
    /// Page cache + reclaimable slab before and after.
    public var cacheBeforeKiB: UInt64
    public var cacheAfterKiB: UInt64
    public var milliseconds: Int
    public init(mode: MemoryReclaimMode, atUptimeSeconds: Double, cacheBeforeKiB: UInt64, cacheAfterKiB: UInt64, milliseconds: Int) {
        self.mode = mode
        self.atUptimeSeconds = atUptimeSeconds
        self.cacheBeforeKiB = cacheBeforeKiB
        self.cacheAfterKiB = cacheAfterKiB
        self.milliseconds = milliseconds
    }
}

/// What `uvm status` shows.
public struct VMStatus: Codable, Sendable, Equatable {
    public var state: String
    public var accelerator: String?
    public var acceleratorReason: String?
    public var kernelRelease: String?
    public var uptimeSeconds: Double?
    public var qemuPID: Int32?
    public var memoryMiB: Int?
    public var guestMemTotalKiB: UInt64?
    public var guestMemAvailableKiB: UInt64?
    public var domain: String?
    public var libvirtURI: String?
    public var daemonPID: Int32
    public var daemonRSSKiB: UInt64?
    public var sessions: Int
    /// The idle reaper's view (nil from a uvmd that predates it).
    public var clients: Int?
    public var idleStopInSeconds: Double?
    public var vmIdleTimeout: String?
    public var instanceIdleTimeout: String?
    public var instances: [InstanceStatus]?
    /// How the last stop ended: a clean power-off, or why the VM had to be destroyed.
    public var lastStop: String?
    /// What the VM holds: the guest's page cache and swap, QEMU's resident memory on the host.
    public var guestMemCachedKiB: UInt64?
    public var guestSwapTotalKiB: UInt64?
    public var guestSwapUsedKiB: UInt64?
    public var qemuRSSKiB: UInt64?
    /// `[vm] autoMemoryReclaim` as the guest applies it, and its last reclaim ("seconds ago" is
    /// from the guest's clock at the time of the status call).
    public var memoryReclaim: String?
    public var lastReclaim: ReclaimRecord?
    public var lastReclaimSecondsAgo: Double?
    /// Each installed distribution's disk: what it takes on the host next to its maximum.
    public var disks: [DiskUsage]?
    /// Where the running VM's boot spent its time, and the BIOS it started from.
    public var boot: BootPhases?
    public var firmware: String?
    public init(state: String, daemonPID: Int32, sessions: Int) {
        self.state = state
        self.daemonPID = daemonPID
        self.sessions = sessions
    }
}

/// A distribution's sparse disk in `uvm status`.
public struct DiskUsage: Codable, Sendable, Equatable {
    public var name: String
    public var allocatedBytes: UInt64
    public var sizeBytes: UInt64
    public init(name: String, allocatedBytes: UInt64, sizeBytes: UInt64) {
        self.name = name
        self.allocatedBytes = allocatedBytes
        self.sizeBytes = sizeBytes
    }
}

/// A distro instance in `uvm status` and `uvm list`.
public struct InstanceStatus: Codable, Sendable, Equatable {
    public var name: String
    /// Stopped, Running or Stopping.
    public var state: String
    public var clients: Int
    /// Seconds until the idle reaper stops it, if a stop is pending.
    public var idleStopInSeconds: Double?
    public var isDefault: Bool
    /// Idle, but kept running by its `[boot] keepAlive = services`: what it runs.
    public var keptBy: [String]?
    public init(name: String, state: String, clients: Int, idleStopInSeconds: Double? = nil, isDefault: Bool = false) {
        self.name = name
        self.state = state
        self.clients = clients
        self.idleStopInSeconds = idleStopInSeconds
        self.isDefault = isDefault
    }
}

private let encoder: JSONEncoder = {
    let e = JSONEncoder()
    e.outputFormatting = [.sortedKeys]
    return e
}()

extension Frame {
    /// A frame whose payload is `value` as JSON.
    public static func json<T: Encodable>(_ kind: FrameKind, _ value: T) -> Frame {
        // Encoding our own plain structs cannot fail.
        let data = try! encoder.encode(value)
        return Frame(kind, ByteBuffer(bytes: data))
    }

    public func decode<T: Decodable>(_ type: T.Type) throws -> T {
        do {
            return try JSONDecoder().decode(T.self, from: Data(self.payload.readableBytesView))
        } catch {
            throw WireProtocolError.malformed("bad \(kind) frame: \(error)")
        }
    }

    public static func signal(_ number: Int32) -> Frame {
        var b = ByteBuffer()
        b.writeInteger(number)
        return Frame(.signal, b)
    }

    public var signalNumber: Int32? { payload.getInteger(at: payload.readerIndex, as: Int32.self) }

    public static func stdinAck(_ bytes: Int) -> Frame {
        var b = ByteBuffer()
        b.writeInteger(UInt32(bytes))
        return Frame(.stdinAck, b)
    }

    public var ackedBytes: Int? { payload.getInteger(at: payload.readerIndex, as: UInt32.self).map(Int.init) }

    public static func resize(rows: UInt16, cols: UInt16) -> Frame {
        var b = ByteBuffer()
        b.writeInteger(rows)
        b.writeInteger(cols)
        return Frame(.resize, b)
    }

    public var windowSize: (rows: UInt16, cols: UInt16)? {
        guard let r = payload.getInteger(at: payload.readerIndex, as: UInt16.self),
              let c = payload.getInteger(at: payload.readerIndex + 2, as: UInt16.self) else { return nil }
        return (r, c)
    }

    public static func error(_ error: WireError) -> Frame { .json(.error, error) }

    public static func progress(_ line: String) -> Frame { Frame(.progress, ByteBuffer(string: line)) }
}

/// Where a cold start's time went, in seconds: host-side phases by uvmd's clock, guest-side ones
/// from the guest's uptime, so that `make bench` can say which hop to cut.
public struct BootPhases: Codable, Sendable, Equatable {
    /// Boot requested to libvirt asked: distro disks, accelerator probe, swap file, domain XML.
    public var prepare: Double
    /// libvirt creating the domain: QEMU started, set up over QMP, and let run.
    public var libvirt: Double
    /// libvirt done to the kernel's clock starting: firmware, loading the kernel (from the
    /// guest's uptime at its first answer, so it carries that answer's trip too).
    public var firmware: Double?
    /// The kernel's clock starting to /init running (the initramfs unpacked, devices probed).
    public var kernel: Double?
    /// /init running to the agent's first answer reaching uvmd (its port found, HTTP/2 up).
    public var agent: Double?
    /// After that answer: swap, memory policy, shares mounted.
    public var setup: Double
    /// Boot requested to the VM ready for sessions.
    public var total: Double
    public init(prepare: Double, libvirt: Double, firmware: Double?, kernel: Double?, agent: Double?, setup: Double, total: Double) {
        (self.prepare, self.libvirt, self.firmware, self.kernel, self.agent, self.setup, self.total) = (prepare, libvirt, firmware, kernel, agent, setup, total)
    }
}

/// The hops of one exec session, for `make bench`: each side times its own part with its own
/// clock (the guest's and the host's are not comparable), and the link is what is left over.
public enum SessionTrace {
    /// Agent: the request read off its stream (in the event loop) to its session's task running.
    public static let guestDispatch = "guest.dispatch"
    /// Agent: request decoded to the process spawned (instance, account, pipes, fork+exec).
    public static let guestBeforeSpawn = "guest.beforeSpawn"
    /// Agent: spawned to its exit seen (the command itself).
    public static let guestProcess = "guest.process"
    /// Agent: exit seen to the exit frame written (output drained, channels closed).
    public static let guestAfterExit = "guest.afterExit"
    /// uvmd: the client's request read to the guest's request written (checks, reaper, stream).
    public static let daemonBeforeGuest = "uvmd.beforeGuest"
    /// uvmd: guest session opened to its exit frame read, less the agent's own time above:
    /// HTTP/2 and the virtio-serial link both ways, and the agent's work outside those hops
    /// (reading the request, writing frames).
    public static let link = "uvmd.link"
    /// CLI: main() to connected to uvmd.
    public static let cliConnect = "cli.connect"
    /// CLI: connected to the exit frame read (everything above, and the frames to and from uvmd).
    public static let cliSession = "cli.session"
    /// Monotonic seconds, for differences on one side.
    public static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
