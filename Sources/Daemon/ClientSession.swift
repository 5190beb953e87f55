import Distros
import Foundation
import Logging
import NIOCore
import NIOPosix
import Settings
import Wire

/// One connection from `uvm`: a request, then (for exec) frames relayed both ways between the
/// client and one HTTP/2 stream to the guest agent.
struct ClientSession {
    let daemon: UVMDaemon
    let channel: NIOAsyncChannel<Frame, Frame>

    func run() async {
        // Only our own user may talk to us (the socket is 0600 too; this also covers an
        // activated socket whose mode we did not choose).
        let peer = await peerUID()
        guard peer == geteuid() else {
            daemon.logger.warning("refused a connection from another user", metadata: ["uid": "\(peer.map { "\($0)" } ?? "?")"])
            // Said before closing, so that the other user's `uvm` does not just see a closed socket.
            let refusal = WireError(.permissionDenied, "this uvmd (\(daemon.paths.socket)) serves uid \(geteuid()) only; each user runs their own uvmd (unset UVM_SOCKET/UVM_HOME)")
            try? await channel.executeThenClose { inbound, outbound in
                // Its request first (2 s at most): closing on unread data would reset the
                // connection, and the client would see "broken pipe" instead of the reason.
                _ = try? await withTimeout(seconds: 2, what: "the request") {
                    var frames = inbound.makeAsyncIterator()
                    return try await frames.next() != nil
                }
                try await outbound.write(.error(refusal))
            }
            return
        }
        do {
            try await FrameSession.serve(channel) { first, rest, outbound in
                do {
                    let request = try first.decodeRequest(DaemonRequest.self, who: "uvmd (pid \(getpid()))")
                    try await serve(request, rest: rest, outbound: outbound)
                } catch var e as WireError {
                    // `uvm` and uvmd from different builds: the running uvmd is the one to go.
                    if e.code == .versionMismatch {
                        e.message += "; restart uvmd: `kill \(getpid())` (it stops its VM cleanly), then run the command again"
                    }
                    try? await outbound.write(.error(e))
                } catch {
                    // Not an answer we meant to give: log it with the request it ended.
                    daemon.logger.error("request failed", metadata: ["op": "\(first.requestOperation)", "error": "\(error)"])
                    try? await outbound.write(.error(WireError(.internalError, "\(error)")))
                }
            }
        } catch {
            daemon.logger.debug("client session ended: \(error)")
        }
    }

    /// SO_PEERCRED: the uid of the process at the other end.
    private func peerUID() async -> uid_t? {
        struct PeerCredentials { var pid: Int32 = 0; var uid: UInt32 = .max; var gid: UInt32 = .max }
        guard let provider = channel.channel as? SocketOptionProvider,
              let cred: PeerCredentials = try? await provider.unsafeGetSocketOption(
                level: .init(SOL_SOCKET), name: .init(SO_PEERCRED)).get()
        else { return nil }
        return cred.uid
    }

    private func serve(_ request: DaemonRequest, rest: AsyncStream<Frame>, outbound: NIOAsyncChannelOutboundWriter<Frame>) async throws {
        let controller = daemon.controller
        let progress: @Sendable (String) async -> Void = { line in try? await outbound.write(.progress(line)) }
        switch request {
        case .exec(var exec):
            let received = SessionTrace.now()
            guard !exec.argv.isEmpty || exec.shell == true else { throw WireError(.badRequest, "exec: no command given") }
            let distro = try await knownDistro(exec.distro, command: "exec --distro NAME")
            exec.distro = distro
            // The caller's environment is for host programs only: the guest never sees it.
            let hostEnv = exec.hostEnv ?? []
            exec.hostEnv = nil
            let interop = daemon.settings.interopEnabled
            exec.interop = interop ? true : nil
            // Started inside a shared folder: run in the same folder as the guest sees it.
            if exec.cwd == nil, let host = exec.hostCwd, let guest = await controller.shares.guestCwd(forHost: host) {
                exec.cwd = guest
                exec.cwdIsImplicit = true
            }
            // A client of the instance for as long as the session lasts: the reaper waits for it.
            let reaper = daemon.reaper
            let token = await reaper.begin(distro: distro)
            defer { Task { await reaper.end(token) } }
            // A distro installed or first used after the VM booted: its disk is hot-plugged now.
            let agent = try await controller.prepareDisk(distro, progress: progress)
            let sent = SessionTrace.now(), tracing = exec.trace == true
            let shares = controller.shares, logger = daemon.logger
            let running = InteropHost.Count()
            let hostRun = interop ? HostRunner { r in
                // Each `hostRun` is a host process: a session (or a guest sending them itself) gets a bounded number at once.
                guard running.enter(limit: InteropHost.maxPerSession) else {
                    await InteropHost.refuse(r, "more than \(InteropHost.maxPerSession) host programs at once in this session", agent: agent)
                    return
                }
                defer { running.leave() }
                await InteropHost.run(r, env: hostEnv, hostCwd: await shares.hostPath(forGuest: r.cwd), agent: agent, logger: logger)
            } : nil
            try await relay(.exec(GuestExecRequest(exec: exec, distroDisk: diskSerial(distro))), agent: agent, rest: rest, outbound: outbound,
                            hostRun: hostRun) { final in
                // UVM_TRACE: our hops added to the agent's.
                guard tracing, final.kind == .exit, var status = try? final.decode(ExitStatus.self) else { return final }
                var trace = status.trace ?? [:]
                let guestTotal = [SessionTrace.guestDispatch, SessionTrace.guestBeforeSpawn, SessionTrace.guestProcess, SessionTrace.guestAfterExit].compactMap { trace[$0] }.reduce(0, +)
                trace[SessionTrace.daemonBeforeGuest] = sent - received
                trace[SessionTrace.link] = max(0, SessionTrace.now() - sent - guestTotal)
                status.trace = trace
                return .json(.exit, status)
            }
        case .copyIn(var r):
            let distro = try await knownDistro(r.distro, command: "cp … NAME:PATH")
            r.distro = distro
            try await copy(.copyIn(GuestCopyInRequest(copy: r, distroDisk: diskSerial(distro))), distro: distro,
                           rest: rest, outbound: outbound, progress: progress)
        case .copyOut(var r):
            let distro = try await knownDistro(r.distro, command: "cp NAME:PATH …")
            r.distro = distro
            try await copy(.copyOut(GuestCopyOutRequest(copy: r, distroDisk: diskSerial(distro))), distro: distro,
                           rest: rest, outbound: outbound, progress: progress)
        case .start(let r):
            _ = try await controller.agent(progress: progress)
            try await respond(await daemon.status(), to: r, outbound)
        case .stop(let r):
            await controller.stop(reason: "by `uvm stop`")
            try await respond(await daemon.status(), to: r, outbound)
        case .status(let r):
            try await respond(await daemon.status(), to: r, outbound)
        case .shareAdd(let r):
            try await respond(try await controller.shares.add(r.share), to: r, outbound)
        case .shareList(let r):
            try await respond(try await controller.shares.list(), to: r, outbound)
        case .shareRemove(let r):
            try await controller.shares.remove(r.name)
            try await respond(try await controller.shares.list(), to: r, outbound)
        case .ports(let r):
            try await respond(await daemon.forwarder.list(), to: r, outbound)
        case .importDistro(let r):
            try await DistroCommands(session: self).importDistro(r, rest: rest, outbound: outbound, progress: progress)
        case .export(let r):
            try await DistroCommands(session: self).export(r, rest: rest, outbound: outbound, progress: progress)
        case .unregister(let r):
            try await DistroCommands(session: self).unregister(r.name, progress: progress)
            try await respond(Done(), to: r, outbound)
        case .setDefault(let r):
            try await DistroCommands(session: self).setDefault(r.name)
            try await respond(Done(), to: r, outbound)
        case .terminate(let r):
            try await DistroCommands(session: self).terminate(r.name)
            try await respond(Done(), to: r, outbound)
        case .resize(let r):
            try await respond(try await DistroCommands(session: self).resize(r, progress: progress), to: r, outbound)
        case .compact(let r):
            try await respond(try await DistroCommands(session: self).compact(r, progress: progress), to: r, outbound)
        case .files(let r):
            try await serveFiles(r, rest: rest, outbound: outbound)
        }
    }

    /// `requested`, or the default distro, if this user has it.
    private func knownDistro(_ requested: String?, command: String) async throws -> String {
        let controller = daemon.controller
        let distro = requested ?? controller.distros.defaultDistro
        guard validDistroName(distro), await controller.knowsDistro(distro) else {
            throw WireError(.notFound, "there is no distro '\(distro)' (installed: \(installedDistros().joined(separator: ", "))); `uvm \(command)` takes one of those")
        }
        return distro
    }

    /// `uvm cp`: a client of the instance while the tar crosses, as an exec is.
    private func copy(_ request: GuestRequest, distro: String, rest: AsyncStream<Frame>,
                      outbound: NIOAsyncChannelOutboundWriter<Frame>, progress: @escaping @Sendable (String) async -> Void) async throws {
        let reaper = daemon.reaper
        let token = await reaper.begin(distro: distro)
        defer { Task { await reaper.end(token) } }
        let agent = try await daemon.controller.prepareDisk(distro, progress: progress)
        try await relay(request, agent: agent, rest: rest, outbound: outbound)
    }

    /// The answer to `call`: typed by it, so a response of the wrong type does not compile.
    func respond<C: DaemonCall>(_ response: C.Response, to call: C, _ outbound: NIOAsyncChannelOutboundWriter<Frame>) async throws {
        try await outbound.write(.json(.response, response))
    }

    /// Client <-> guest. Ends when the guest sends its final frame, or either side goes away.
    /// `answer` turns the guest's final frame into the client's (an import's result into the
    /// distro's description); a WireError it throws goes to the client instead.
    func relay(_ request: GuestRequest, agent: GuestAgentClient, rest: AsyncStream<Frame>,
               outbound: NIOAsyncChannelOutboundWriter<Frame>,
               hostRun: HostRunner? = nil,
               answer: @escaping @Sendable (Frame) async throws -> Frame = { $0 }) async throws {
        let controller = daemon.controller
        try await agent.session(request) { guestIn, guestOut in
            // Each child says whether the session is over: the guest answered (true), the client
            // went away (true), or the guest stopped taking input (false: its answer is coming).
            try await withThrowingTaskGroup(of: Bool.self) { group in
                group.addTask {
                    for await frame in rest {
                        switch frame.kind {
                        case .stdin, .stdinEOF, .signal, .resize:
                            // A guest that ended the session (an import refused mid-stream) no
                            // longer reads; its final frame, not this write's error, is the answer.
                            do { try await guestOut.write(frame) } catch { return false }
                        default: throw WireError(.protocolError, "unexpected \(frame.kind) frame from the client")
                        }
                    }
                    return true  // the client went away: end the guest session too
                }
                group.addTask {
                    var answered = false
                    // Read on after the final frame until the guest closes the stream: closing it
                    // ourselves would reset it.
                    for try await frame in guestIn where !answered {
                        answered = frame.kind.isFinal
                        if frame.kind == .hostRun {
                            // uvm-host (interop): never passed to the client; ignored where off.
                            if let hostRun, let r = try? frame.decode(HostRunRequest.self) { Task { await hostRun.run(r) } }
                            continue
                        }
                        // A process that `uvm stop` ended: say so rather than pass on its signal.
                        if frame.kind == .exit, await controller.isStopping {
                            let reason = await controller.lastStopReason ?? "session ended: the VM was stopped"
                            try await outbound.write(.error(WireError(.vmStopped, "uvm: \(reason)")))
                            continue
                        }
                        if answered {
                            let reply: Frame
                            do { reply = try await answer(frame) } catch let e as WireError { reply = .error(e) }
                            try await outbound.write(reply)
                        } else {
                            try await outbound.write(frame)
                        }
                    }
                    if answered { return true }
                    // The stream ended without an answer: the VM (or the link) went away.
                    daemon.logger.warning("the guest ended a session without answering", metadata: ["op": "\(request.op)"])
                    let reason = await controller.lastStopReason ?? "session ended: the VM stopped unexpectedly (QEMU exited)"
                    try await outbound.write(.error(WireError(.vmStopped, "uvm: \(reason)")))
                    return true
                }
                while let over = try await group.next(), !over {}
                group.cancelAll()
            }
        }
    }

    /// What an exec session does with the guest's `hostRun` frames (interop on).
    struct HostRunner: Sendable {
        let run: @Sendable (HostRunRequest) async -> Void
    }

    func installedDistros() -> [String] {
        DistroStore(paths: daemon.paths, settings: daemon.settings).listed()
    }
}
