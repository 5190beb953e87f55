import CSyscalls
import Glibc
import NIOCore
import NIOPosix
import Synchronization
import Wire

/// One `exec`: a process in a distro instance whose stdio travels as frames on one session.
struct ProcessSession {
    let request: ExecRequest
    let diskSerial: String
    let instances: Instances
    /// The session's frames after the request.
    let inbound: AsyncStream<Frame>
    let outbound: NIOAsyncChannelOutboundWriter<Frame>
    /// When the request came off its stream (SessionTrace.now()), for the trace.
    var arrived: Double? = nil

    static let defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

    func run() async throws {
        let started = SessionTrace.now()
        let distro = request.distro ?? "busybox"
        let instance = try await instances.instance(distro, diskSerial: diskSerial, ignoreConfig: request.ignoreDistroConfig == true)
        let account = try instance.account(request.user)
        let argv = request.shell == true ? [account.shell, "-l"] : request.argv
        guard !argv.isEmpty else { throw WireError(.badRequest, "exec: no command given") }

        var env: [String: String] = [
            "PATH": Self.defaultPath, "HOME": account.home, "USER": account.name,
            "LOGNAME": account.name, "SHELL": account.shell,
        ]
        if request.tty { env["TERM"] = "xterm-256color" }
        // Under systemd, the user's manager (lingering) has its runtime folder and bus: what
        // `systemctl --user`, Podman and D-Bus clients look for.
        if instance.systemd, account.uid != 0, access("\(instance.rootPath)/run/user/\(account.uid)", F_OK) == 0 {
            env["XDG_RUNTIME_DIR"] = "/run/user/\(account.uid)"
            env["DBUS_SESSION_BUS_ADDRESS"] = "unix:path=/run/user/\(account.uid)/bus"
        }
        // uvm-host is always found (and says how to turn interop on); with interop, this session
        // gets its socket and xdg-open goes to the host's.
        let interop = request.interop == true && !instance.interopRefused ? try InteropListener(outbound: outbound) : nil
        defer { interop?.close() }
        if let interop {
            env.merge(interop.environment(path: Self.defaultPath)) { $1 }
        } else {
            env["PATH"] = Self.defaultPath + ":" + InteropListener.binDirectory
        }
        for kv in request.env {
            guard let eq = kv.firstIndex(of: "=") else { throw WireError(.badRequest, "--env \(kv): expected KEY=VALUE") }
            env[String(kv[..<eq])] = String(kv[kv.index(after: eq)...])
        }
        let cwd = request.cwd ?? account.home

        // Child ends go to the process; ours become NIO channels.
        var childFDs: [Int32] = []
        defer { childFDs.forEach { close($0) } }
        let stdoutChannelFD: (input: Int32, output: Int32?)
        var stderrFD: Int32? = nil
        let stdio: (Int32, Int32, Int32)
        if request.tty {
            var master: Int32 = -1, slave: Int32 = -1
            let rc = uvm_openpty("\(instance.rootPath)/dev/ptmx", &master, &slave, request.rows ?? 24, request.cols ?? 80)
            guard rc == 0 else { throw WireError(.spawnFailed, "cannot open a pty: \(String(cString: strerror(rc)))") }
            childFDs.append(slave)
            stdio = (slave, slave, slave)
            stdoutChannelFD = (master, nil)
        } else {
            let inPipe = try makePipe(), outPipe = try makePipe(), errPipe = try makePipe()
            childFDs += [inPipe.read, outPipe.write, errPipe.write]
            stdio = (inPipe.read, outPipe.write, errPipe.write)
            stdoutChannelFD = (outPipe.read, inPipe.write)
            stderrFD = errPipe.read
        }

        let pid: pid_t
        do {
            pid = try spawn(argv: argv, env: env, cwd: cwd, account: account, stdio: stdio, instance: instance)
        } catch let e as ExecFailure {
            // As a shell reports it: a message on stderr, 127 for not found, 126 for not runnable.
            for fd in [stdoutChannelFD.input, stdoutChannelFD.output, stderrFD].compactMap({ $0 }) { close(fd) }
            try await outbound.write(Frame(.stderr, ByteBuffer(string: "uvm: \(argv[0]): \(String(cString: strerror(e.errno)))\n")))
            try await outbound.write(.json(.exit, ExitStatus(code: e.errno == ENOENT ? 127 : 126)))
            return
        } catch {
            for fd in [stdoutChannelFD.input, stdoutChannelFD.output, stderrFD].compactMap({ $0 }) { close(fd) }
            throw error
        }
        childFDs.forEach { close($0) }
        childFDs = []
        interop?.start(sessionPID: pid)
        let spawned = SessionTrace.now()

        // Our own descriptors of the output pipes (or the pty master), never read: after the
        // process exits they say whether output still waits to be read, whatever NIO has got to.
        let outputWatch = [stdoutChannelFD.input, stderrFD].compactMap { $0 }.map { fcntl($0, F_DUPFD_CLOEXEC, 0) }.filter { $0 >= 0 }
        defer { outputWatch.forEach { close($0) } }

        let group = MultiThreadedEventLoopGroup.singleton
        // Stdin is a channel of its own, not the output side of stdout's: a process that exits
        // with stdin unread makes the write fail (EPIPE), and NIO then closes the whole channel,
        // whose stdout side failed the session ("I/O on closed channel") with output unread.
        let mainChannel: NIOAsyncChannel<ByteBuffer, ByteBuffer>
        var stdinChannel: NIOAsyncChannel<ByteBuffer, ByteBuffer>? = nil
        if let out = stdoutChannelFD.output {
            mainChannel = try await NIOPipeBootstrap(group: group).takingOwnershipOfDescriptor(input: stdoutChannelFD.input) { channel in
                channel.eventLoop.makeCompletedFuture { try NIOAsyncChannel(wrappingChannelSynchronously: channel) }
            }
            stdinChannel = try await NIOPipeBootstrap(group: group).takingOwnershipOfDescriptor(output: out) { channel in
                channel.eventLoop.makeCompletedFuture { try NIOAsyncChannel(wrappingChannelSynchronously: channel, configuration: .init(isOutboundHalfClosureEnabled: true)) }
            }
        } else {
            mainChannel = try await NIOPipeBootstrap(group: group).takingOwnershipOfDescriptor(inputOutput: stdoutChannelFD.input) { channel in
                channel.eventLoop.makeCompletedFuture { try NIOAsyncChannel(wrappingChannelSynchronously: channel) }
            }
        }
        let errChannel: NIOAsyncChannel<ByteBuffer, ByteBuffer>? = if let stderrFD {
            try await NIOPipeBootstrap(group: group).takingOwnershipOfDescriptor(input: stderrFD) { channel in
                channel.eventLoop.makeCompletedFuture { try NIOAsyncChannel(wrappingChannelSynchronously: channel) }
            }
        } else { nil }

        let master = request.tty ? stdoutChannelFD.input : nil
        let (status, exited): (Int32, Double) = try await mainChannel.executeThenClose { mainIn, mainOut in
            guard let stdinChannel else {
                return try await supervise(pid: pid, output: mainIn, errChannel: errChannel,
                                           stdin: mainOut, stdinChannel: mainChannel.channel, master: master, watch: outputWatch)
            }
            return try await stdinChannel.executeThenClose { _, stdinOut in
                try await supervise(pid: pid, output: mainIn, errChannel: errChannel,
                                    stdin: stdinOut, stdinChannel: stdinChannel.channel, master: master, watch: outputWatch)
            }
        }
        var exit = ExitStatus(waitStatus: status)
        if request.trace == true {
            exit.trace = [SessionTrace.guestBeforeSpawn: spawned - started, SessionTrace.guestProcess: exited - spawned,
                          SessionTrace.guestAfterExit: SessionTrace.now() - exited]
            if let arrived { exit.trace?[SessionTrace.guestDispatch] = started - arrived }
        }
        try await outbound.write(.json(.exit, exit))
    }

    /// Relays the process's stdio until it has exited and its output has ended (or gone idle);
    /// returns its wait status and when its exit was seen.
    private func supervise(pid: pid_t, output: NIOAsyncChannelInboundStream<ByteBuffer>, errChannel: NIOAsyncChannel<ByteBuffer, ByteBuffer>?,
                           stdin: NIOAsyncChannelOutboundWriter<ByteBuffer>, stdinChannel: Channel, master: Int32?,
                           watch: [Int32]) async throws -> (Int32, Double) {
        let activity = ActivityCounter()
        // Input from the client runs until the session ends; it is not part of the group
        // below because the process may exit while the client still holds its stdin.
        let input = Task { await relayInput(to: stdin, channel: stdinChannel, pid: pid, master: master) }
        defer { input.cancel() }
        return try await withThrowingTaskGroup(of: ProcessEvent.self) { events in
            events.addTask { try await pump(output, as: .stdout, activity: activity); return .outputClosed }
            if let errChannel {
                events.addTask {
                    try await errChannel.executeThenClose { errIn, _ in try await pump(errIn, as: .stderr, activity: activity) }
                    return .outputClosed
                }
            }
            events.addTask { .exited(await ChildReaper.shared.wait(for: pid)) }
            var open = errChannel == nil ? 1 : 2
            var status: Int32? = nil
            var exitedAt = 0.0
            while let event = try await events.next() {
                switch event {
                case .outputClosed: open -= 1
                case .exited(let st):
                    status = st
                    exitedAt = SessionTrace.now()
                    // What the process wrote is in the pipes already. Wait for EOF, but not
                    // for background processes that inherited the pipes: stop once idle. Idle
                    // is nothing read for 250 ms, no chunk on its way to the client, and nothing
                    // waiting in the pipes, neither data nor the EOF of writers gone. Output
                    // that NIO or the client's stream was slow to take (a busy guest, a cold
                    // boot, a pager not reading yet) was dropped when idleness was only "nothing
                    // read for 250 ms": an exit status 0 arrived without the output.
                    // A chunk on its way waits for the client, as long as the client is there
                    // (if it goes, the write fails and the session ends). Output left in the
                    // pipes with nothing on its way should be read at once: that wait is bounded.
                    events.addTask {
                        var last = activity.value
                        var stalled = 0
                        while true {
                            try await Task.sleep(for: .milliseconds(250))
                            let now = activity.value
                            if now != last || activity.inFlight > 0 {
                                last = now
                                stalled = 0
                                continue
                            }
                            if !watch.contains(where: { uvm_readable_now($0) != 0 }) { return .outputIdle }
                            stalled += 1
                            if stalled >= 240 {
                                log("process \(pid): its output waited 60 s in its pipes, unread, after it exited; ending the session")
                                return .outputIdle
                            }
                        }
                    }
                case .outputIdle: open = 0
                }
                if let status, open == 0 {
                    events.cancelAll()
                    return (status, exitedAt)
                }
            }
            throw WireError(.internalError, "process \(pid) lost")
        }
    }

    private func pump(_ input: NIOAsyncChannelInboundStream<ByteBuffer>, as kind: FrameKind, activity: ActivityCounter) async throws {
        do {
            for try await chunk in input {
                activity.begin()
                defer { activity.end() }
                try await outbound.write(Frame(kind, chunk))
            }
        } catch let e as IOError where e.errnoCode == EIO {
            // A pty master reads EIO once the last slave is closed: that is its EOF.
        }
    }

    /// Client -> process: stdin bytes, EOF, signals, window size. When the client goes away
    /// (the stream ends without the process having exited), the process group gets SIGHUP, as
    /// it would from a terminal that hangs up.
    ///
    /// Stdin is written by a task of its own, so a process that does not read holds back neither
    /// signals and resizes nor the end of the stream behind its data. Each write is acknowledged
    /// (`stdinAck`): the client keeps at most `Frame.stdinWindow` bytes unacknowledged, which
    /// bounds what waits here.
    private func relayInput(to stdin: NIOAsyncChannelOutboundWriter<ByteBuffer>, channel: Channel, pid: pid_t, master: Int32?) async {
        let (pending, feed) = AsyncStream<Frame>.makeStream()
        let queued = ByteCount()
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                // Acknowledged in batches (fewer frames through a VM exit each), but at once
                // when nothing else is queued: the client may be waiting for exactly that.
                var unacked = 0
                for await frame in pending {
                    if frame.kind == .stdinEOF {
                        if master == nil { await stdin.finish(after: channel) }
                        continue
                    }
                    let n = frame.payload.readableBytes
                    try? await stdin.write(frame.payload)
                    queued.add(-n)
                    unacked += n
                    if unacked >= Frame.stdinWindow / 4 || queued.value == 0 {
                        try? await outbound.write(.stdinAck(unacked))
                        unacked = 0
                    }
                }
            }
            for await frame in inbound {
                switch frame.kind {
                case .stdin:
                    // A client that ignores the window is held back here, as all were before.
                    while queued.value > 4 * Frame.stdinWindow, !Task.isCancelled {
                        try? await Task.sleep(for: .milliseconds(5))
                    }
                    queued.add(frame.payload.readableBytes)
                    feed.yield(frame)
                case .stdinEOF: feed.yield(frame)
                case .signal:
                    if let sig = frame.signalNumber, sig > 0, sig < 65 { signalGroup(pid, sig) }
                case .resize:
                    if let master, let ws = frame.windowSize {
                        _ = uvm_set_winsize(master, ws.rows, ws.cols)
                    }
                default: break
                }
            }
            feed.finish()
            if !Task.isCancelled { signalGroup(pid, SIGHUP) }
            // Whatever stdin is still queued nobody will acknowledge: the session is over.
            group.cancelAll()
        }
    }

    private func spawn(argv: [String], env: [String: String], cwd: String, account: Account,
                       stdio: (Int32, Int32, Int32), instance: Instance) throws -> pid_t {
        // A working directory mapped from the host's is a convenience: where this user cannot
        // enter it, start at home as if none had been given.
        let fallback: String? = request.cwdIsImplicit == true ? account.home : nil
        return try spawnProcess(argv: argv, env: env, cwd: cwd, fallbackCwd: fallback, account: account,
                                stdio: stdio, tty: request.tty, instancePID: instance.initPID, cgroup: instance.sessionCgroup)
    }
}

/// Starts `argv` as `account` in the namespaces of `instancePID` (0: ours), with `stdio` as its
/// fds 0-2, in `cgroup` (a cgroup v2 directory) when given and there; returns its pid, for
/// `ChildReaper.shared.wait(for:)`.
package func spawnProcess(argv: [String], env: [String: String], cwd: String, fallbackCwd: String?, account: Account,
                  stdio: (Int32, Int32, Int32), tty: Bool, instancePID: pid_t, cgroup: String? = nil) throws -> pid_t {
    // An instance started without cgroups (none in the VM) has no such directory: stay.
    let procs = cgroup.map { open($0 + "/cgroup.procs", O_WRONLY | O_CLOEXEC) } ?? -1
    defer { if procs >= 0 { close(procs) } }
    let cArgv = argv.map { strdup($0) } + [nil]
    let cEnv = env.sorted { $0.key < $1.key }.map { strdup("\($0.key)=\($0.value)") } + [nil]
    defer {
        cArgv.forEach { free($0) }
        cEnv.forEach { free($0) }
    }
    var helper: pid_t = 0
    var failed: pid_t = 0
    var err: Int32 = 0
    var stage: UnsafePointer<CChar>? = nil
    let pid: pid_t = cArgv.withUnsafeBufferPointer { argvPtr in
        cEnv.withUnsafeBufferPointer { envPtr in
            account.groups.withUnsafeBufferPointer { groupsPtr in
                (env["PATH"] ?? ProcessSession.defaultPath).withCString { pathEnv in
                    cwd.withCString { cwdPtr in
                      fallbackCwd.withOptionalCString { fallbackPtr in
                        var a = uvm_spawn_args()
                        a.argv = argvPtr.baseAddress
                        a.envp = envPtr.baseAddress
                        a.path_env = pathEnv
                        a.cwd = cwdPtr
                        a.fallback_cwd = fallbackPtr
                        a.uid = account.uid
                        a.gid = account.gid
                        a.groups = groupsPtr.baseAddress
                        a.ngroups = Int32(groupsPtr.count)
                        a.stdin_fd = stdio.0
                        a.stdout_fd = stdio.1
                        a.stderr_fd = stdio.2
                        a.tty = tty ? 1 : 0
                        a.instance_pid = instancePID
                        a.cgroup_procs_fd = procs
                        return uvm_spawn(&a, &helper, &failed, &err, &stage)
                      }
                    }
                }
            }
        }
    }
    // Nobody waits for these two: without `ignore` their statuses would be kept for ever,
    // and handed to a later process that gets the same pid.
    if helper > 0 { ChildReaper.shared.ignore(helper) }
    if failed > 0 { ChildReaper.shared.ignore(failed) }
    ChildReaper.shared.childStarted()
    guard pid > 0 else {
        let what = stage.map { String(cString: $0) } ?? "spawn"
        let reason = String(cString: strerror(err))
        switch what {
        case "exec": throw ExecFailure(errno: err)
        case "chdir": throw WireError(.spawnFailed, "cannot change to \(cwd): \(reason)")
        default: throw WireError(.spawnFailed, "cannot start \(argv[0]) (\(what)): \(reason)")
        }
    }
    return pid
}

/// execve itself failed: the command is missing or cannot be run.
package struct ExecFailure: Error { package var errno: Int32 }

private enum ProcessEvent: Sendable {
    case outputClosed, exited(Int32), outputIdle
}

/// Signals the process group the process leads (it called setsid), or the process alone.
func signalGroup(_ pid: pid_t, _ sig: Int32) {
    if kill(-pid, sig) != 0 { kill(pid, sig) }
}

func makePipe() throws -> (read: Int32, write: Int32) {
    var fds: [Int32] = [0, 0]
    let rc = uvm_pipe_cloexec(&fds)
    guard rc == 0 else { throw WireError(.spawnFailed, "pipe: \(String(cString: strerror(rc)))") }
    return (fds[0], fds[1])
}

/// Stdin bytes queued for a process and not written yet.
final class ByteCount: Sendable {
    private let count = Atomic<Int>(0)
    func add(_ n: Int) { count.add(n, ordering: .relaxed) }
    var value: Int { count.load(ordering: .relaxed) }
}

/// Counts output chunks, and those read but not yet handed to the client's stream, so that a
/// drain can tell whether output is still flowing.
final class ActivityCounter: Sendable {
    private let count = Atomic<Int>(0)
    private let writing = Atomic<Int>(0)
    func begin() {
        count.add(1, ordering: .relaxed)
        writing.add(1, ordering: .relaxed)
    }
    func end() { writing.subtract(1, ordering: .relaxed) }
    var value: Int { count.load(ordering: .relaxed) }
    var inFlight: Int { writing.load(ordering: .relaxed) }
}

extension Optional where Wrapped == String {
    func withOptionalCString<R>(_ body: (UnsafePointer<CChar>?) -> R) -> R {
        switch self {
        case .some(let s): return s.withCString { body($0) }
        case .none: return body(nil)
        }
    }
}
