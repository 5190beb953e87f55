import CSyscalls
import Glibc
import NIOPosix
import Wire

/// Host folders mounted over 9P, under UVM_SHARES_DIR, which every instance sees at /mnt/host.
/// Each share has a channel of the kernel's shared-memory transport (`trans=uvmshm`: the kernel
/// talks to uvmd directly), or on a VM without it a virtio-serial port of its own, where a relay
/// thread moves bytes between the port and the socket the kernel's `trans=fd` client uses.
actor ShareMounts {
    /// A mounted share; the relay thread when it goes through a virtio-serial port.
    private struct Mounted {
        var relay: RelayHandle?
    }
    private var mounted: [String: Mounted] = [:]
    static let mountTimeoutSeconds = 20

    /// The shared tree the mounts go under: a tmpfs of its own, made shared so that instances
    /// (slaves of it) see every later mount and unmount.
    static func prepare() {
        mkdir(UVM_SHARES_DIR, 0o755)
        _ = uvm_mount("tmpfs", UVM_SHARES_DIR, "tmpfs", UInt(MS_NOSUID | MS_NODEV), "mode=0755")
        _ = uvm_mount("", UVM_SHARES_DIR, "", UInt(MS_SHARED), nil)
    }

    var names: [String] { mounted.keys.sorted() }

    func mount(_ request: MountRequest) async throws {
        let name = request.name
        guard !name.isEmpty, !name.contains("/"), name != ".", name != ".." else {
            throw WireError(.badRequest, "bad share name '\(name)'")
        }
        if mounted[name] != nil { try await unmount(name) }
        if let channel = request.channel {
            try await mountChannel(channel, request)
            return
        }
        let portPath = try await GuestAgent.findPort(named: request.port)
        // The previous user of this port may still be letting go of it (EBUSY).
        var port: Int32 = -1
        for _ in 0..<100 {
            port = open(portPath, O_RDWR | O_CLOEXEC | O_NOCTTY)
            if port >= 0 || errno != EBUSY { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        guard port >= 0 else { throw WireError(.internalError, "share \(name): cannot open \(portPath): \(String(cString: strerror(errno)))") }
        // uvmd connects before asking; the guest learns of it a moment later.
        guard uvm_wait_port_connected(port, 5000) == 0 else {
            close(port)
            throw WireError(.internalError, "share \(name): the host end of \(request.port) is not connected")
        }
        var sv: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &sv) == 0 else {
            close(port)
            throw WireError(.internalError, "share \(name): socketpair: \(String(cString: strerror(errno)))")
        }
        guard let relayPtr = uvm_relay_start(port, sv[1]) else {
            close(port); close(sv[0]); close(sv[1])
            throw WireError(.internalError, "share \(name): cannot start the relay: \(String(cString: strerror(errno)))")
        }
        let relay = RelayHandle(pointer: relayPtr)
        let target = "\(UVM_SHARES_DIR)/\(name)"
        mkdir(target, 0o755)
        // cache=mmap, as WSL mounts its drives: no page cache for reads and writes, so what the
        // guest writes is on the host when write() returns and host changes show at once; only
        // mmap()ed files are cached, so programs that map files writable still work.
        // access=client: the guest kernel checks permissions against the owners and modes the
        // server reports, as on a local file system.
        let options = "trans=fd,rfdno=\(sv[0]),wfdno=\(sv[0]),\(Self.options(request))"
        let flags = Self.flags(request)
        // Blocking (Tversion and Tattach go through the relay): keep it off the cooperative pool.
        // A server that never answers must not hang the boot: after the bound, shutting the
        // socket down makes the kernel see EOF and fail the mount.
        let kernelEnd = sv[0]
        let rc = await withTaskGroup(of: Int32?.self) { group in
            group.addTask { await blocking { uvm_mount("uvm-\(name)", target, "9p", flags, options) } }
            group.addTask {
                guard (try? await Task.sleep(for: .seconds(Self.mountTimeoutSeconds))) != nil else { return nil }
                shutdown(kernelEnd, Int32(SHUT_RDWR))
                return nil
            }
            var result: Int32 = ETIMEDOUT
            while let r = await group.next() {
                if let r {
                    result = r
                    group.cancelAll()
                }
            }
            return result
        }
        close(kernelEnd)  // the kernel holds its own reference from here on
        guard rc == 0 else {
            _ = uvm_relay_finish(relay.pointer, 0)
            rmdir(target)
            throw WireError(.internalError, "share \(name): mount failed: \(String(cString: strerror(rc))) (the 9P server refused the attach or did not answer within \(Self.mountTimeoutSeconds) s)")
        }
        mounted[name] = Mounted(relay: relay)
        log("share \(name) mounted at \(target) from \(request.port)")
    }

    /// What every 9P mount of a share says, whatever its transport. cache=meta (kernel-patches/0005)
    /// is cache=mmap for data, but attributes, entries and missing names are cached, kept true by
    /// the server's change notes; a transport or server that cannot give them gets cache=mmap.
    private static func options(_ request: MountRequest) -> String {
        let cache = request.metadataCache == true ? "meta" : "mmap"
        return "version=9p2000.L,msize=\(request.msize),cache=\(cache),access=client,aname=\(request.aname ?? request.name)"
    }

    private static func flags(_ request: MountRequest) -> UInt {
        UInt(MS_NOSUID | MS_NODEV) | (request.readOnly ? UInt(MS_RDONLY) : 0)
    }

    /// The shared-memory transport: no relay, the kernel's client reaches uvmd's rings itself.
    /// uvmd bounds the mount: a server that does not answer has its channel closed, which fails
    /// the kernel's requests.
    private func mountChannel(_ channel: Int, _ request: MountRequest) async throws {
        let name = request.name
        let target = "\(UVM_SHARES_DIR)/\(name)"
        mkdir(target, 0o755)
        let options = "trans=uvmshm,\(Self.options(request))"
        let flags = Self.flags(request)
        var rc: Int32 = 0
        // A mount detached earlier may hold the channel until its last file is closed (EBUSY).
        for _ in 0..<100 {
            rc = await blocking { uvm_mount(String(channel), target, "9p", flags, options) }
            if rc != EBUSY { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        guard rc == 0 else {
            rmdir(target)
            throw WireError(.internalError, "share \(name): mount of shared-memory channel \(channel) failed: \(String(cString: strerror(rc)))")
        }
        mounted[name] = Mounted(relay: nil)
        log("share \(name) mounted at \(target) from shared-memory channel \(channel)")
    }

    /// Detaches the mount (files still open in the guest fail with EIO once the relay is gone)
    /// and frees the port for another share. `serverGone`: its 9P server went with uvmd, so the
    /// relay is ended first (the kernel sees EOF and fails what waits for an answer) rather than
    /// given a second to pass the last requests on.
    func unmount(_ name: String, serverGone: Bool = false) async throws {
        guard let m = mounted.removeValue(forKey: name) else {
            throw WireError(.notFound, "share \(name) is not mounted")
        }
        let target = "\(UVM_SHARES_DIR)/\(name)"
        var relay = m.relay
        if serverGone, let r = relay {
            _ = await blocking { uvm_relay_finish(r.pointer, 0) }
            relay = nil
        }
        // The mount leaves the tree at once; when nothing else holds it, the same call then tears
        // the 9P client down, which clunks its fids: bounded, for a server that is gone.
        if await onOwnThread(within: .seconds(2), "unmounting \(target)", { _ = umount2(target, Int32(MNT_DETACH)) }) {
            rmdir(target)
        }
        // The kernel closes its end once nothing in the guest uses the mount any more.
        if let relay {
            _ = await blocking { uvm_relay_finish(relay.pointer, 1000) }
        }
        log("share \(name) unmounted")
    }

    /// The control connection ended: uvmd is gone (killed, crashed, restarted), and every share's
    /// 9P server with it. Nothing may wait on those servers: the shared-memory channels' requests
    /// would wait for replies for ever (only uvmd closes a channel, and the next uvmd cannot reach
    /// that memory), and with them the mounts' teardown and every sync() behind it. So the kernel
    /// fails the channels, the relays end, and every mount is detached: the next uvmd mounts its
    /// shares afresh.
    func serverGone() async {
        Self.closeSharedMemoryChannels()
        for name in names { try? await unmount(name, serverGone: true) }
    }

    /// The uvmshm transport's switch (kernel-patches/): fails every request on its channels, now and
    /// later. Absent on a kernel without the transport (shares then use only relays).
    static let closeChannelsPath = "/sys/bus/pci/drivers/uvm-9p/close_channels"

    private static func closeSharedMemoryChannels() {
        let fd = open(closeChannelsPath, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return }
        defer { close(fd) }
        if write(fd, "1\n", 2) != 2 {
            log("cannot close the 9P shared-memory channels: \(String(cString: strerror(errno)))")
        } else {
            log("9P shared-memory channels closed: their server is gone")
        }
    }

    /// Before power-off: nothing is left writing to the host.
    func unmountAll() async {
        for name in names { try? await unmount(name) }
    }
}

/// The relay thread's handle: used by one owner at a time (the actor, then the finishing call).
struct RelayHandle: @unchecked Sendable {
    let pointer: OpaquePointer
}
