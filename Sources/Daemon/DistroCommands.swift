import Distros
import Foundation
import NIOCore
import NIOPosix
import Settings
import Wire

/// `uvm import`, `export`, `unregister`, `default` and `terminate` as uvmd runs them. A new
/// distro's disk is made on the host (a sparse file with an empty ext4), hot-plugged into the VM,
/// and filled by the guest agent from the tar stream, so that owners, devices and capabilities
/// arrive exactly without root on the host. Nothing is registered until the guest says the
/// import is complete; a failed import leaves nothing behind.
struct DistroCommands {
    let session: ClientSession
    var daemon: UVMDaemon { session.daemon }
    var controller: VMController { daemon.controller }

    typealias Outbound = NIOAsyncChannelOutboundWriter<Frame>
    typealias Progress = @Sendable (String) async -> Void

    func importDistro(_ r: ImportRequest, rest: AsyncStream<Frame>, outbound: Outbound, progress: @escaping Progress) async throws {
        // The spool file is ours to delete from here on, whatever happens; only a file in the
        // spool folder is taken (uvmd deletes it), never a path the client chose elsewhere.
        let spool = r.spool
        let ownsSpool = r.image == nil && controller.paths.isSpoolFile(spool)
        defer { if ownsSpool { unlink(spool) } }
        var st = stat()
        if let image = r.image {
            guard spool.isEmpty else { throw WireError(.badRequest, "an import reads a tar or copies an image, not both") }
            guard stat(image, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG, access(image, R_OK) == 0 else {
                throw WireError(.badRequest, "the image \(image) is missing or not a readable file")
            }
        } else {
            guard ownsSpool else {
                throw WireError(.badRequest, "an import's tar must be in \(controller.paths.spoolDir) (named import-...), not \(spool)")
            }
            guard lstat(spool, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG, st.st_size > 0, st.st_size % 512 == 0 else {
                throw WireError(.badRequest, "the import's tar \(spool) is missing or not a non-empty file of whole 512-byte blocks")
            }
        }
        let name = r.name
        guard validDistroName(name) else {
            throw WireError(.badRequest, "bad distro name '\(name)': letters, digits, '-', '_' or '.', at most 16 bytes, not starting with '.'")
        }
        let store = controller.distros
        switch store.availability(name) {
        case .absent: break
        case .importing:
            throw WireError(.badRequest, "distro \(name) is being imported already (an interrupted import is cleared by `uvm unregister \(name)`)")
        case .installed, .template:
            throw WireError(.badRequest, "there is already a distro named \(name): choose another name (--name), or `uvm unregister \(name)` first")
        }
        let size = r.sizeBytes ?? DistroStore.defaultDiskSize
        guard size >= 64 << 20 else { throw WireError(.badRequest, "--size \(size): a distro disk needs at least 64M") }
        // A client of the VM while it lasts (the reaper must not stop the VM under it); no
        // instance of the new distro runs, so none is left for the reaper to stop after.
        let reaper = daemon.reaper
        let token = await reaper.begin(distro: name)
        defer { Task { await reaper.end(token); await reaper.instanceStopped(name) } }
        do {
            let image = r.image
            try await Self.blocking { try store.createEmptyDisk(name, sizeBytes: size, from: image) }
        } catch let e as DistroStore.InstallError {
            try? await Self.blocking { try store.delete(name) }
            throw WireError(.internalError, e.description)
        }
        let becomesDefault = r.setDefault || !store.hasChosenDefault && !daemon.settings.defaultDistroIsExplicit
        var source: String?
        var failure: Error?
        do {
            await progress("uvm: importing \(name) (its disk: \(controller.paths.distroDisk(name)), sparse, at most \(formatSize(size)))")
            let agent = try await controller.agent(progress: progress)
            try await controller.ensureDiskAttached(name)
            if r.image == nil {
                source = try await controller.attachSpool(spool, what: "the tar of \(name)")
                await progress("uvm: extracting \(UInt64(st.st_size) >> 20) MiB of tar in the VM")
            }
            let request = ImportDistroRequest(name: name, diskSerial: diskSerial(name), sourceSerial: source,
                                              sourceBytes: UInt64(st.st_size), defaultUser: Self.hostUser())
            let tar = source
            try await session.relay(.importDistro(request), agent: agent, rest: rest, outbound: outbound) { final in
                // The guest is done with the tar: it goes before the client hears the outcome.
                if let tar {
                    await controller.detachSpool(spool, serial: tar)
                    unlink(spool)
                }
                // Refused (not a root file system, corrupt, cancelled): the disk goes before the
                // client hears so, so that nothing of it is left when `uvm import` returns.
                guard final.kind == .response else {
                    await abandon(name, store: store)
                    return final
                }
                let imported = try final.decode(ImportedDistro.self)
                store.finishImport(name)
                if becomesDefault { try? store.setDefault(name) }
                let usage = store.diskUsage(name)
                return .json(.response, DistroInfo(name: name, prettyName: imported.prettyName, disk: controller.paths.distroDisk(name),
                                                   sizeBytes: usage.size, allocatedBytes: usage.allocated, isDefault: becomesDefault))
            }
        } catch {
            failure = error
        }
        // Whatever happened: the tar's disk leaves the VM (if the answer did not take it already).
        // A failure, or a disk still marked as importing (refused, the client went away), means
        // the half-filled disk goes.
        if let source, await controller.isAttached(serial: source) { await controller.detachSpool(spool, serial: source) }
        if let failure {
            await abandon(name, store: store)
            throw failure
        }
        if case .importing = store.availability(name) { await abandon(name, store: store) }
    }

    /// A failed import: the guest lets go of the disk, it is detached and deleted.
    private func abandon(_ name: String, store: DistroStore) async {
        await release(name)
        try? await Self.blocking { try store.delete(name) }
        daemon.logger.info("import abandoned", metadata: ["distro": "\(name)"])
    }

    /// The instance stopped, the disk unmounted in the guest and detached from the VM.
    private func release(_ name: String) async {
        if let agent = await controller.runningAgent {
            _ = try? await withTimeout(seconds: 30, what: "the guest to let go of \(name)'s disk") {
                try await agent.call(ReleaseDiskRequest(name: name, diskSerial: diskSerial(name)))
            }
            await controller.detachDisk(name)
        }
    }

    /// `body` with the distro's disk attached to the VM (started if need be), as a client of the
    /// idle reaper for as long as it runs.
    private func withDisk<T: Sendable>(_ name: String, progress: @escaping Progress,
                                       _ body: (GuestAgentClient) async throws -> T) async throws -> T {
        guard controller.distros.knows(name) else {
            throw WireError(.notFound, "there is no distro '\(name)' (installed: \(session.installedDistros().joined(separator: ", ")))")
        }
        let reaper = daemon.reaper
        let token = await reaper.begin(distro: name)
        defer { Task { await reaper.end(token) } }
        return try await body(try await controller.prepareDisk(name, progress: progress))
    }

    func export(_ r: ExportRequest, rest: AsyncStream<Frame>, outbound: Outbound, progress: @escaping Progress) async throws {
        try await withDisk(r.name, progress: progress) { agent in
            try await export(r, agent: agent, rest: rest, outbound: outbound, progress: progress)
        }
    }

    private func export(_ r: ExportRequest, agent: GuestAgentClient, rest: AsyncStream<Frame>, outbound: Outbound,
                        progress: @escaping Progress) async throws {
        let store = controller.distros
        // The guest writes the tar onto a sparse scratch disk (no tar of a file system is much
        // larger than the file system) that uvmd then streams to the client.
        let room = store.diskUsage(r.name).size + (1 << 30)
        let spool = try Self.makeExportSpool(controller.paths, size: room)
        defer { unlink(spool) }
        let target = try await controller.attachSpool(spool, what: "the tar of \(r.name)", writable: true)
        var failure: Error?
        do {
            await progress("uvm: packing \(r.name) in the VM")
            let request = ExportDistroRequest(name: r.name, diskSerial: diskSerial(r.name), targetSerial: target, targetBytes: room)
            try await session.relay(.exportDistro(request), agent: agent, rest: rest, outbound: outbound) { final in
                await controller.detachSpool(spool, serial: target)
                guard final.kind == .response else { return final }
                let result = try final.decode(ExportResult.self)
                guard result.bytes <= room else { throw WireError(.protocolError, "the guest says its tar has \(result.bytes) bytes, more than the \(room) it had") }
                try await Self.stream(spool, bytes: result.bytes, to: outbound)
                return final
            }
        } catch {
            failure = error
        }
        // The answer detached it, unless there was none.
        if await controller.isAttached(serial: target) { await controller.detachSpool(spool, serial: target) }
        if let failure { throw failure }
    }

    /// A new sparse export spool file of `size` bytes.
    static func makeExportSpool(_ paths: Paths, size: UInt64) throws -> String {
        guard let (fd, path) = paths.createSpoolFile(.export) else {
            throw WireError(.internalError, "cannot create a file in \(paths.spoolDir): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        guard ftruncate(fd, off_t(size)) == 0 else {
            let e = errno
            unlink(path)
            throw WireError(.internalError, "cannot size \(path): \(String(cString: strerror(e)))")
        }
        return path
    }

    /// The first `bytes` bytes of `path` as `stdout` frames (reads on the thread pool; each write
    /// waits for the client to take the previous ones).
    static func stream(_ path: String, bytes: UInt64, to outbound: Outbound) async throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw WireError(.internalError, "cannot read \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var offset: UInt64 = 0
        while offset < bytes {
            let want = Int(min(UInt64(1 << 20), bytes - offset))
            let at = offset
            let chunk: ByteBuffer = try await Self.blocking {
                var buffer = ByteBufferAllocator().buffer(capacity: want)
                var failure: Int32 = 0
                let got = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: want) { p in
                    let n = pread(fd, p.baseAddress!, want, off_t(at))
                    if n < 0 { failure = errno }
                    return max(n, 0)
                }
                guard got > 0 else { throw WireError(.internalError, "reading \(path) at byte \(at): \(failure != 0 ? String(cString: strerror(failure)) : "it ended early")") }
                return buffer
            }
            offset += UInt64(chunk.readableBytes)
            try await outbound.write(Frame(.stdout, chunk))
        }
    }

    func unregister(_ name: String, progress: @escaping Progress) async throws {
        let store = controller.distros
        switch store.availability(name) {
        case .absent, .template:
            throw WireError(.notFound, "there is no installed distro '\(name)' (installed: \(store.installed().map(\.name).joined(separator: ", ")))")
        case .installed, .importing: break
        }
        if daemon.settings.defaultDistroIsExplicit && daemon.settings.defaultDistro == name {
            throw WireError(.badRequest, "\(name) is the default distro set in uvm.conf or UVM_DEFAULT_DISTRO: change defaultDistro there first")
        }
        if await daemon.reaper.snapshot().instances.contains(where: { $0.name == name }) {
            await progress("uvm: stopping \(name)'s instance (its processes get SIGTERM, then SIGKILL)")
        }
        await release(name)
        await daemon.reaper.instanceStopped(name)
        let wasDefault = store.hasChosenDefault && store.defaultDistro == name
        do {
            try await Self.blocking {
                try store.delete(name)
                if wasDefault { store.forgetDefault() }
            }
        } catch {
            throw WireError(.internalError, "cannot delete \(name)'s disk: \(error)")
        }
        if wasDefault { await progress("uvm: \(name) was the default distro; the default is now \(controller.distros.defaultDistro)") }
        daemon.logger.info("distro unregistered", metadata: ["distro": "\(name)"])
    }

    func setDefault(_ name: String) async throws {
        let store = controller.distros
        guard store.knows(name) else {
            throw WireError(.notFound, "there is no distro '\(name)' (installed: \(session.installedDistros().joined(separator: ", ")))")
        }
        if daemon.settings.defaultDistroIsExplicit && daemon.settings.defaultDistro != name {
            throw WireError(.badRequest, "uvm.conf or UVM_DEFAULT_DISTRO sets defaultDistro = \(daemon.settings.defaultDistro), which wins over `uvm default`: change it there")
        }
        do { try store.setDefault(name) } catch { throw WireError(.internalError, "\(error)") }
    }

    func terminate(_ name: String) async throws {
        guard controller.distros.knows(name) else {
            throw WireError(.notFound, "there is no distro '\(name)' (installed: \(session.installedDistros().joined(separator: ", ")))")
        }
        await controller.stopInstance(name)
        await daemon.reaper.instanceStopped(name)
    }

    func resize(_ r: ResizeRequest, progress: @escaping Progress) async throws -> DistroInfo {
        let store = controller.distros
        guard case .installed = store.availability(r.name) else {
            throw WireError(.notFound, "there is no installed distro '\(r.name)' (installed: \(store.installed().map(\.name).joined(separator: ", ")))")
        }
        guard r.sizeBytes >= 64 << 20 else { throw WireError(.badRequest, "--resize \(r.sizeBytes): a distro disk needs at least 64M") }
        // Nothing may use the disk while its file system changes size: the instance stops and
        // the disk leaves the VM (it is attached again when next used).
        await progress("uvm: stopping \(r.name) and resizing its disk")
        await release(r.name)
        await daemon.reaper.instanceStopped(r.name)
        if await controller.isDiskAttached(r.name) {
            throw WireError(.vmUnavailable, "\(r.name)'s disk is still attached to the VM: `uvm stop`, then resize again")
        }
        do {
            try await Self.blocking { try store.resize(r.name, sizeBytes: r.sizeBytes) }
        } catch {
            throw WireError(.badRequest, "cannot resize \(r.name): \(error)")
        }
        let usage = store.diskUsage(r.name)
        return DistroInfo(name: r.name, disk: controller.paths.distroDisk(r.name), sizeBytes: usage.size,
                          allocatedBytes: usage.allocated, isDefault: store.defaultDistro == r.name)
    }

    /// FITRIM in the guest over the distro's file system, with the VM started and the disk
    /// attached if need be; what the disk takes on the host before and after.
    func compact(_ r: CompactRequest, progress: @escaping Progress) async throws -> CompactResult {
        let store = controller.distros
        return try await withDisk(r.name, progress: progress) { agent in
            let before = store.diskUsage(r.name)
            await progress("uvm: trimming \(r.name)'s file system")
            let trimmed = try await withTimeout(seconds: 600, what: "the guest to trim \(r.name)") {
                try await agent.call(TrimRequest(serial: diskSerial(r.name)))
            }
            let after = store.diskUsage(r.name)
            return CompactResult(name: r.name, allocatedBeforeBytes: before.allocated, allocatedAfterBytes: after.allocated,
                                 sizeBytes: after.size, trimmedBytes: trimmed.trimmedBytes)
        }
    }

    /// The host user becomes the new distro's default user (root stays root).
    static func hostUser() -> DefaultUser? {
        let uid = getuid()
        guard uid != 0, let pw = getpwuid(uid), let n = pw.pointee.pw_name else { return nil }
        return DefaultUser(name: String(cString: n), uid: uid, gid: getgid())
    }

    static func blocking<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await NIOThreadPool.singleton.runIfActive(body)
    }
}

func formatSize(_ bytes: UInt64) -> String {
    if bytes >= 1 << 30 && bytes % (1 << 30) == 0 { return "\(bytes >> 30) GiB" }
    if bytes >= 1 << 20 { return "\(bytes >> 20) MiB" }
    return "\(bytes) bytes"
}
