import CSyscalls
import Glibc
import NIOCore
import NIOPosix
import Synchronization
import Wire

/// uvm-init: PID 1 of the utility VM. It prepares the bare initramfs, finds its virtio-serial
/// port, and serves sessions from uvmd (one HTTP/2 stream each) until told to power off.
public enum GuestAgent {
    public static let controlPortName = "uvm.control"

    /// PID 1's mounts, called before anything runs on a worker thread: libdispatch's worker
    /// monitor reads /proc/TID/stat and kills the process (SIGILL, "registered worker exited
    /// prematurely") when it cannot, which happened now and then at boot under TCG while
    /// /proc was not mounted yet.
    public static func preparePID1IfNeeded() {
        guard getpid() == 1, !pid1Prepared.exchange(true, ordering: .relaxed) else { return }
        preparePID1()
    }
    private static let pid1Prepared = Atomic<Bool>(false)

    public static func main() async -> Never {
        _ = startedAt
        signal(SIGPIPE, SIG_IGN)
        preparePID1IfNeeded()
        let instances = Instances()
        if getpid() == 1 {
            GuestNetwork.configureInBackground()
            // The event loops' threads start while the control port is found and opened (~50 ms
            // under TCG that the first answer no longer waits for).
            startThread {
                _ = MultiThreadedEventLoopGroup.singleton.next()
                StallReport.start(probes: [("the instances' actor", { _ = await instances.names })])
            }
        }
        let cmdline = readSmallFile("/proc/cmdline") ?? ""
        if cmdline.split(whereSeparator: { $0 == " " || $0 == "\n" }).contains("uvm.poweroff=1") {
            // Baseline for benchmarks: the same kernel and initramfs, booted and powered off.
            log("uvm.poweroff=1: powering off at once")
            _ = uvm_poweroff()
        }
        ShareMounts.prepare()
        let shares = ShareMounts()
        do {
            let port = try await findPort(named: controlPortName)
            try await serve(port: port, instances: instances, shares: shares)
        } catch {
            log("fatal: \(error)")
        }
        // PID 1 must not exit (the kernel would panic): power off instead.
        _ = uvm_poweroff()
        while true { pause() }
    }

    /// Serves the control port forever; when uvmd goes away (a restart), waits for it to return.
    /// Sessions belong to no connection: one whose process ignores SIGHUP lives on after its uvmd
    /// is gone, and waiting for it kept the next uvmd out until it gave up and destroyed the VM.
    static func serve(port: String, instances: Instances, shares: ShareMounts) async throws {
        while true {
            let fd = open(port, O_RDWR | O_CLOEXEC | O_NOCTTY)
            guard fd >= 0 else {
                throw WireError(.internalError, "cannot open \(port): \(String(cString: strerror(errno)))")
            }
            // Until the host side is connected the port reads EOF and polls HUP, which NIO would
            // take for the end of the connection.
            _ = uvm_wait_port_connected(fd, -1)
            let channel = try await NIOPipeBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .takingOwnershipOfDescriptor(inputOutput: fd) { ch in
                    HTTP2Sessions.configureRoutedServer(ch) { stream in
                        try stream.pipeline.syncOperations.addHandler(SessionRouter { first, request, session, arrived in
                            Task { await handle(session, first: first, request: request, arrived: arrived, instances: instances, shares: shares) }
                        })
                    }.map { ch }
                }
            log("host connected on \(port)")
            do {
                try await channel.closeFuture.get()
            } catch {
                log("control connection ended: \(error)")
            }
            // The port opens once at a time (EBUSY): our descriptor must be gone before the next open.
            try? await channel.close()
            log("host disconnected; waiting for it to return")
            // The shares' 9P servers were that uvmd's: before the next one comes, nothing may be
            // left waiting on them (a stuck unmount holds its superblock, and sync() waits on it).
            await shares.serverGone()
        }
    }

    static func handle(_ session: HTTP2Sessions.Session, first: Frame, request: Result<GuestRequest, WireError>,
                       arrived: Double, instances: Instances, shares: ShareMounts) async {
        do {
            try await FrameSession.serve(session, alreadyRead: first) { first, rest, outbound in
                do {
                    try await perform(try request.get(), rest: rest, outbound: outbound, arrived: arrived, instances: instances, shares: shares)
                } catch let e as WireError {
                    try await outbound.write(.error(e))
                } catch {
                    // Not an answer we meant to give: the console log says where it came from.
                    log("\(first.requestOperation) failed: \(error)")
                    try await outbound.write(.error(WireError(.internalError, "\(error)")))
                }
            }
        } catch {
            log("session: \(error)")
        }
    }


    static func perform(_ request: GuestRequest, rest: AsyncStream<Frame>, outbound: NIOAsyncChannelOutboundWriter<Frame>,
                        arrived: Double? = nil, instances: Instances, shares: ShareMounts) async throws {
        switch request {
        case .exec(let r):
            try await ProcessSession(request: r.exec, diskSerial: r.distroDisk, instances: instances,
                                     inbound: rest, outbound: outbound, arrived: arrived).run()
        case .info:
            try await outbound.write(.json(.response, await info(instances)))
        case .shutdown:
            log("shutdown requested: stopping instances")
            await instances.stopAll()
            await shares.unmountAll()
            // uvm_poweroff syncs (bounded) once the answer is on its way.
            try await outbound.write(.json(.response, Done()))
            // Let the answer reach the host before the machine goes away.
            try await Task.sleep(for: .milliseconds(50))
            log("powering off")
            _ = uvm_poweroff()
        case .swapOn(let r):
            let device = try await DistroDisks.device(serial: r.serial, within: 10)
            guard uvm_swapon(device) == 0 else {
                throw WireError(.internalError, "swapon \(device): \(String(cString: strerror(errno)))")
            }
            log("swap on \(device)")
            try await outbound.write(.json(.response, Done()))
        case .memoryPolicy(let r):
            try MemoryReclaimer.shared.apply(r)
            try await outbound.write(.json(.response, Done()))
        case .instanceActivity(let r):
            try await outbound.write(.json(.response, await instances.activity(r.name)))
        case .trim(let r):
            try await outbound.write(.json(.response, try await DistroDisks.trim(r, instances: instances)))
        case .mount(let m):
            try await shares.mount(m)
            try await outbound.write(.json(.response, Done()))
        case .unmount(let u):
            try await shares.unmount(u.name)
            try await outbound.write(.json(.response, Done()))
        case .startInstance(let s):
            _ = try await instances.instance(s.name, diskSerial: s.diskSerial)
            try await outbound.write(.json(.response, Done()))
        case .stopInstance(let s):
            log("stopping instance \(s.name) (idle)")
            await instances.stop(s.name)
            await boundedSync()
            try await outbound.write(.json(.response, Done()))
        case .watchPorts:
            try await PortTracker(instances: instances).watch(rest: rest, outbound: outbound)
        case .connect:
            // Served in the event loop (SessionRouter); only a connect without a port gets here.
            throw WireError(.badRequest, "connect without a port")
        case .importDistro(let r):
            let imported = try await DistroDisks.importDistro(r, inbound: rest, outbound: outbound)
            try await outbound.write(.json(.response, imported))
        case .exportDistro(let r):
            let result = try await DistroDisks.exportDistro(r, instances: instances)
            try await outbound.write(.json(.response, result))
        case .copyIn(let r):
            let result = try await FileCopy.copyIn(r, instances: instances, inbound: rest, outbound: outbound)
            try await outbound.write(.json(.response, result))
        case .copyOut(let r):
            let result = try await FileCopy.copyOut(r, instances: instances, outbound: outbound)
            try await outbound.write(.json(.response, result))
        case .interopAttach(let r):
            try await InteropAttach.serve(r, inbound: rest, outbound: outbound)
        case .releaseDisk(let r):
            await DistroDisks.releaseDisk(r, instances: instances)
            try await outbound.write(.json(.response, Done()))
        case .serveFiles(let r):
            try await FileServer.serve(r, instances: instances, rest: rest, outbound: outbound)
        }
    }

    static func info(_ instances: Instances) async -> GuestInfo {
        var u = utsname()
        uname(&u)
        let release = withUnsafeBytes(of: u.release) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        let uptime = guestUptime()
        let meminfo = MemInfo.read()
        var info = GuestInfo(kernelRelease: release, uptimeSeconds: uptime, memTotalKiB: meminfo["MemTotal"] ?? 0,
                             memAvailableKiB: meminfo["MemAvailable"] ?? 0, instances: await instances.names)
        info.memCachedKiB = meminfo["Cached"]
        info.swapTotalKiB = meminfo["SwapTotal"]
        info.swapFreeKiB = meminfo["SwapFree"]
        info.memoryReclaim = MemoryReclaimer.shared.mode
        info.lastReclaim = MemoryReclaimer.shared.lastReclaim
        info.initStartedSeconds = initStartedSeconds
        return info
    }

    /// The guest's uptime when the agent's main() began. (Not PID 1's start time in /proc: the
    /// kernel creates that task long before it runs /init.)
    static let startedAt: Double = guestUptime()
    static var initStartedSeconds: Double? { getpid() == 1 ? startedAt : nil }

    /// /dev/vportNpM whose name (from the host's <target name=...>) is `name`; no udev here.
    static func findPort(named name: String) async throws -> String {
        for _ in 0..<500 {
            if let dir = opendir("/sys/class/virtio-ports") {
                defer { closedir(dir) }
                while let e = readdir(dir) {
                    let port = direntName(e)
                    guard port.hasPrefix("vport") else { continue }
                    if readSmallFile("/sys/class/virtio-ports/\(port)/name")?.trimmed == name { return "/dev/\(port)" }
                }
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        throw WireError(.internalError, "no virtio-serial port named \(name)")
    }

    /// The initramfs has nothing mounted and maybe no console on fds 0-2.
    static func preparePID1() {
        _ = uvm_mount("devtmpfs", "/dev", "devtmpfs", UInt(MS_NOSUID), "mode=0755")
        // What udev's default rules do and devtmpfs does not: tun (rootless containers'
        // slirp4netns, VPN clients) and fuse (user-space file systems) are everyone's.
        chmod("/dev/net/tun", 0o666)
        chmod("/dev/fuse", 0o666)
        for fd: Int32 in 0...2 where fcntl(fd, F_GETFD) < 0 {
            let c = open("/dev/console", O_RDWR | O_NOCTTY)
            if c >= 0 && c != fd { dup2(c, fd); close(c) }
        }
        _ = uvm_mount("proc", "/proc", "proc", UInt(MS_NOSUID | MS_NODEV | MS_NOEXEC), nil)
        _ = uvm_mount("sysfs", "/sys", "sysfs", UInt(MS_NOSUID | MS_NODEV | MS_NOEXEC), nil)
        _ = uvm_mount("tmpfs", "/run", "tmpfs", UInt(MS_NOSUID | MS_NODEV), "mode=0755")
        _ = uvm_mount("tmpfs", "/tmp", "tmpfs", UInt(MS_NOSUID | MS_NODEV), "mode=1777")
        MemoryReclaimer.mountCgroup()
        mkdir("/run/uvm", 0o755)
        mkdir("/run/uvm/instances", 0o755)
        _ = sethostname("uvm", 3)
        _ = uvm_if_up("lo")
        umask(0o022)
    }
}

/// The first frame of each stream says what it is. A forwarded connection is served right there
/// in the event loop (`PortRelay`); everything else becomes a `Session` served by a task.
final class SessionRouter: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = Frame
    typealias Start = @Sendable (Frame, Result<GuestRequest, WireError>, HTTP2Sessions.Session, Double) -> Void
    private let start: Start
    private var routed = false

    init(_ start: @escaping Start) { self.start = start }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !routed else { return context.fireChannelRead(data) }
        routed = true
        let arrived = SessionTrace.now()
        let first = unwrapInboundIn(data)
        let request: Result<GuestRequest, WireError>
        do {
            request = .success(try first.decodeGuestRequest(who: "the guest agent"))
        } catch let e as WireError {
            request = .failure(e)
        } catch {
            request = .failure(WireError(.badRequest, "\(error)"))
        }
        do {
            if case .success(.connect(let c)) = request, c.port > 0 {
                try PortRelay.start(port: c.port, stream: context.channel)
            } else {
                start(first, request, try HTTP2Sessions.Session(wrappingChannelSynchronously: context.channel), arrived)
            }
            // Whatever follows goes straight to what serves the stream.
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        } catch {
            log("session: \(error)")
            context.close(promise: nil)
        }
    }
}

func log(_ message: String) {
    let line = "uvm-init: \(message)\n"
    _ = line.withCString { write(logDescriptor, $0, strlen($0)) }
}

/// PID 1 logs to the console through a non-blocking descriptor of its own: a serial line that
/// stops draining (QEMU's end stuck) drops log lines instead of blocking the thread that logs,
/// which would stall the agent's actors and every session with them. Elsewhere (tests): stderr.
private let logDescriptor: Int32 = {
    guard getpid() == 1 else { return 2 }
    let fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_NONBLOCK | O_CLOEXEC)
    return fd >= 0 ? fd : 2
}()
