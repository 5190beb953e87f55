import CSyscalls
import Glibc
import Logging
import NIOCore
import NIOPosix
import Synchronization
import Wire

/// `uvm-host` as uvmd serves it: the program runs on the host as this user, with the environment
/// of the `uvm` that started the session, in the host folder matching the command's guest folder
/// (inside a share; else the home directory), and its stdio crosses on an `interopAttach` stream.
/// Only asked for on sessions where interop is on; the agent checked the command belongs to one.
enum InteropHost {
    static let maxPerSession = 32

    /// Host programs running for one session.
    final class Count: Sendable {
        private let n = Atomic<Int>(0)
        func enter(limit: Int) -> Bool {
            if n.add(1, ordering: .acquiringAndReleasing).newValue <= limit { return true }
            n.subtract(1, ordering: .acquiringAndReleasing)
            return false
        }
        func leave() { n.subtract(1, ordering: .acquiringAndReleasing) }
    }

    /// Ends the waiting command `r` with `why` (on stderr) and status 126, without running anything.
    static func refuse(_ r: HostRunRequest, _ why: String, agent: GuestAgentClient) async {
        _ = try? await agent.session(.interopAttach(InteropAttachRequest(id: r.id))) { _, guestOut in
            try await guestOut.write(Frame(.stderr, ByteBuffer(string: "uvm-host: refused: \(why)\n")))
            try await guestOut.write(.json(.exit, ExitStatus(code: 126)))
        }
    }

    static func run(_ r: HostRunRequest, env: [String], hostCwd: String?, agent: GuestAgentClient, logger: Logger) async {
        let home = env.first { $0.hasPrefix("HOME=") }.map { String($0.dropFirst(5)) } ?? (getenv("HOME").map { String(cString: $0) } ?? "/")
        var fds: [Int32] = [-1, -1, -1, -1, -1, -1]  // stdin r/w, stdout r/w, stderr r/w
        let piped = fds.withUnsafeMutableBufferPointer { b in
            (0..<3).allSatisfy { uvm_pipe_cloexec(b.baseAddress! + 2 * $0) == 0 }
        }
        var pid: pid_t = -1
        var spawnErrno: Int32 = 0
        if piped, !r.argv.isEmpty {
            let argv = r.argv.map { strdup($0) } + [nil]
            let envp = env.map { strdup($0) } + [nil]
            defer { (argv + envp).forEach { free($0) } }
            pid = uvm_spawn_host(r.argv[0], argv, envp, hostCwd ?? home, home, fds[0], fds[3], fds[5])
            spawnErrno = errno
        }
        for i in [0, 3, 5] where fds[i] >= 0 { close(fds[i]) }
        if pid < 0 { for i in [1, 2, 4] where fds[i] >= 0 { close(fds[i]) } }
        logger.info("interop: host program", metadata: ["argv": "\(r.argv.prefix(8))", "cwd": "\(hostCwd ?? home)", "pid": "\(pid)"])
        let started = pid
        let exited = ExitFlag(), handedOver = ExitFlag()
        do {
            try await agent.session(.interopAttach(InteropAttachRequest(id: r.id))) { guestIn, guestOut in
                guard started > 0 else {
                    let why = r.argv.isEmpty ? "no program given" : "\(r.argv[0]): \(String(cString: strerror(spawnErrno)))"
                    try await guestOut.write(Frame(.stderr, ByteBuffer(string: "uvm-host: cannot run on the host: \(why)\n")))
                    try await guestOut.write(.json(.exit, ExitStatus(code: spawnErrno == ENOENT ? 127 : 126)))
                    return
                }
                handedOver.value.store(true, ordering: .releasing)
                try await relay(pid: started, stdin: fds[1], stdout: fds[2], stderr: fds[4], exited: exited,
                                 guestIn: guestIn, guestOut: guestOut)
            }
        } catch {
            logger.debug("interop: the attach stream ended: \(error)")
        }
        if started > 0, !handedOver.value.load(ordering: .acquiring) {
            for i in [1, 2, 4] { close(fds[i]) }  // the stream never opened: nobody took them
        }
        if started > 0, !exited.value.load(ordering: .acquiring) {
            // The guest side went away first: the program goes too, and is reaped. (After it
            // exited, what it started, say the browser xdg-open opened, is left alone.)
            kill(-started, SIGHUP)
            Task.detached { await reap(started) }
        }
    }

    private static func relay(pid: pid_t, stdin: Int32, stdout: Int32, stderr: Int32, exited: ExitFlag,
                              guestIn: NIOAsyncChannelInboundStream<Frame>, guestOut: NIOAsyncChannelOutboundWriter<Frame>) async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        func reader(_ fd: Int32) async throws -> NIOAsyncChannel<ByteBuffer, ByteBuffer> {
            try await NIOPipeBootstrap(group: group).takingOwnershipOfDescriptor(input: fd) { ch in
                ch.eventLoop.makeCompletedFuture { try NIOAsyncChannel(wrappingChannelSynchronously: ch) }
            }
        }
        let out = try await reader(stdout), err = try await reader(stderr)
        let input = try await NIOPipeBootstrap(group: group).takingOwnershipOfDescriptor(output: stdin) { ch in
            ch.eventLoop.makeCompletedFuture {
                try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: ch, configuration: .init(isOutboundHalfClosureEnabled: true))
            }
        }
        try await input.executeThenClose { _, toProgram in
            // The guest's stdin and signals, for as long as the program runs.
            let fromGuest = Task {
                do {
                    for try await frame in guestIn {
                        switch frame.kind {
                        case .stdin: try await toProgram.write(frame.payload)
                        case .stdinEOF: toProgram.finish()
                        case .signal:
                            if let sig = frame.signalNumber, sig > 0, sig < 65 { kill(-pid, sig) }
                        default: break
                        }
                    }
                } catch {}
                // The command in the guest is gone: so is what it ran (unless that has ended).
                if !exited.value.load(ordering: .acquiring) { kill(-pid, SIGHUP) }
            }
            defer { fromGuest.cancel() }
            try await withThrowingTaskGroup(of: Void.self) { tasks in
                for (channel, kind) in [(out, FrameKind.stdout), (err, FrameKind.stderr)] {
                    tasks.addTask {
                        try await channel.executeThenClose { bytes, _ in
                            for try await chunk in bytes { try await guestOut.write(Frame(kind, chunk)) }
                        }
                    }
                }
                try await tasks.waitForAll()
            }
            let status = await reap(pid)
            exited.value.store(true, ordering: .releasing)
            try await guestOut.write(.json(.exit, ExitStatus(waitStatus: status)))
        }
    }

    /// waitpid on a thread of its own: a program may run for hours.
    @discardableResult
    private static func reap(_ pid: pid_t) async -> Int32 {
        await withCheckedContinuation { (k: CheckedContinuation<Int32, Never>) in
            let box = Unmanaged.passRetained(ReapBox(pid: pid, k: k)).toOpaque()
            var thread = pthread_t()
            if pthread_create(&thread, nil, { arg in
                let b = Unmanaged<ReapBox>.fromOpaque(arg!).takeRetainedValue()
                var status: Int32 = 0
                while waitpid(b.pid, &status, 0) < 0 && errno == EINTR {}
                b.k.resume(returning: status)
                return nil
            }, box) == 0 {
                pthread_detach(thread)
            } else {
                Unmanaged<ReapBox>.fromOpaque(box).release()
                var status: Int32 = 0
                waitpid(pid, &status, 0)
                k.resume(returning: status)
            }
        }
    }

    /// A one-way flag: the program has exited (and been reaped: its process group is no longer
    /// ours to signal), or its pipes were handed to the relay.
    final class ExitFlag: Sendable {
        let value = Atomic<Bool>(false)
    }

    private final class ReapBox: @unchecked Sendable {
        let pid: pid_t
        let k: CheckedContinuation<Int32, Never>
        init(pid: pid_t, k: CheckedContinuation<Int32, Never>) { (self.pid, self.k) = (pid, k) }
    }
}
