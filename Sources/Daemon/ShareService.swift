import Logging
import NIOHTTP2
import Settings
import Shares
import Wire

/// Shares as uvmd runs them: the list (ShareStore), their 9P servers (ShareExporter) and the
/// guest's mounts, kept in step while the VM runs, so that `uvm share add/remove` need no restart.
actor ShareService {
    /// 9P ports given to every VM; each mounted share takes one.
    static let portCount = 8

    let store: ShareStore
    let exporter: ShareExporter
    let logger: Logger
    private var agent: GuestAgentClient?
    /// name -> "mounted" or "failed: why", for the running VM.
    private var states: [String: String] = [:]
    /// The share list as last read from the store: every exec asks for its working directory,
    /// and only this actor changes the file (one uvmd per state directory).
    private var cachedEntries: [ShareStore.Entry]?

    private func entries() throws -> [ShareStore.Entry] {
        if let cachedEntries { return cachedEntries }
        let e = try store.entries()
        cachedEntries = e
        return e
    }

    /// Whether guests cache share metadata (`Settings.ninePMetadataCache`).
    private let metadataCache: Bool

    init(paths: Paths, settings: Settings, logger: Logger) {
        store = ShareStore(file: paths.sharesFile, homeShare: settings.homeShare, capacity: Self.portCount)
        exporter = ShareExporter(slots: Self.slots(paths), logger: logger)
        self.logger = logger
        metadataCache = settings.ninePMetadataCache
    }

    static func slots(_ paths: Paths) -> [ShareExporter.Slot] {
        (0..<portCount).map { ShareExporter.Slot(port: "uvm.9p.\($0)", socketPath: paths.ninePSocket($0)) }
    }

    /// The VM is up: mount every share before the first command runs. A share that cannot be
    /// mounted (its folder is gone, say) is reported by `uvm share list`, not fatal.
    func vmStarted(agent: GuestAgentClient, transport: ShmTransport?) async {
        self.agent = agent
        await exporter.use(transport)
        states = [:]
        let entries: [ShareStore.Entry]
        do { entries = try self.entries() } catch {
            logger.error("shares not mounted: \(error)")
            return
        }
        for e in entries { await mount(e.spec) }
    }

    func vmStopped() async {
        agent = nil
        states = [:]
        await exporter.stopAll()
        await exporter.use(nil)
    }

    private func mount(_ spec: ShareSpec) async {
        guard let agent else { return }
        do {
            var share = spec
            share.path = try ShareStore.canonicalDirectory(spec.path)
            let placed = try await exporter.export(share)
            var request = MountRequest(name: share.name, port: placed.slot.port, readOnly: share.readOnly,
                                       aname: share.serverCommand == nil ? nil : share.path, channel: placed.channel,
                                       metadataCache: metadataCache && share.serverCommand == nil)
            if let msize = placed.msize { request.msize = msize }
            let mount = request
            // A server that never answers the guest's attach must not hang the share: when this
            // gives up, stopping the export (below) closes the channel and fails the guest's mount.
            _ = try await withTimeout(seconds: 30, what: "the guest to mount share \(share.name)") {
                try await agent.mount(mount)
            }
            states[spec.name] = "mounted"
            let via = placed.channel.map { "shared memory channel \($0)" } ?? placed.slot.port
            logger.info("share mounted", metadata: ["share": "\(spec.name)", "path": "\(share.path)", "via": "\(via)"])
        } catch {
            await exporter.stop(spec.name)
            states[spec.name] = "failed: \(error)"
            logger.error("share not mounted", metadata: ["share": "\(spec.name)", "error": "\(error)"])
        }
    }

    func add(_ spec: ShareSpec) async throws -> ShareStatus {
        cachedEntries = nil
        let share = try store.add(spec)
        await mount(share)
        return ShareStatus(share: share, source: "user", state: state(share.name))
    }

    func remove(_ name: String) async throws {
        cachedEntries = nil
        try store.remove(name)
        states[name] = nil
        guard let agent, await exporter.exported.contains(name) else { return }
        // The guest unmounts first (and lets go of the port), then the server goes.
        try? await agent.unmount(share: name)
        await exporter.stop(name)
    }

    func list() async throws -> [ShareStatus] {
        var out: [ShareStatus] = []
        for e in try entries() {
            let requests = await exporter.requestCounts(e.spec.name)
            out.append(ShareStatus(share: e.spec, source: e.source, state: state(e.spec.name), requests: requests))
        }
        return out
    }

    private func state(_ name: String) -> String {
        agent == nil ? "pending (mounted when the VM starts)" : (states[name] ?? "pending")
    }

    /// Where a command started in host directory `hostCwd` runs in the guest, if that is in a share.
    func hostPath(forGuest guestPath: String) -> String? {
        guard let all = try? entries() else { return nil }
        return ShareStore.hostPath(forGuest: guestPath, in: all.map(\.spec))
    }

    func guestCwd(forHost hostCwd: String) -> String? {
        guard let all = try? entries() else { return nil }
        return ShareStore.guestPath(forHost: hostCwd, in: all.map(\.spec))
    }
}
