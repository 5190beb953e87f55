import NIOCore
import Settings
import Wire

/// `uvm mount`: one 9P session into a distro's files, relayed to the guest agent's file server.
/// uvmd passes the bytes on without reading them (the CLI's FUSE process treats the guest's
/// replies as untrusted), and the session counts as a client of the instance for as long as it
/// lasts: the CLI holds it only while files are open or operations run, so an idle mount lets
/// the VM stop.
extension ClientSession {
    func serveFiles(_ r: FilesRequest, rest: AsyncStream<Frame>, outbound: NIOAsyncChannelOutboundWriter<Frame>) async throws {
        let controller = daemon.controller
        let distro = r.distro ?? controller.distros.defaultDistro
        guard validDistroName(distro), await controller.knowsDistro(distro) else {
            throw WireError(.notFound, "there is no distro '\(distro)' (installed: \(installedDistros().joined(separator: ", "))); `uvm list` shows them")
        }
        let reaper = daemon.reaper
        let token = await reaper.begin(distro: distro)
        defer { Task { await reaper.end(token) } }
        let progress: @Sendable (String) async -> Void = { line in try? await outbound.write(.progress(line)) }
        let agent = try await controller.prepareDisk(distro, progress: progress)
        try await relay(.serveFiles(ServeFilesRequest(distro: distro, distroDisk: diskSerial(distro), user: r.user)),
                        agent: agent, rest: rest, outbound: outbound)
    }
}
