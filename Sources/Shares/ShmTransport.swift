import CShmRing
import Glibc
import Plan9
import Synchronization
import Wire

/// The host end of the guest kernel's `uvmshm` 9P transport (kernel-patches/): rings in the shared
/// memory of an ivshmem-doorbell device, which QEMU gets from the ivshmem server listening on
/// `socketPath` when the VM starts. An RPC then costs the guest one doorbell write and one
/// interrupt, where the virtio-serial path costs a relay thread's wakeups in each direction.
///
/// A channel is attached to a socket whose other end is a 9P server: the pump thread (C) moves
/// bytes between that socket and the channel's rings, so any stream 9P server (ours, or diod for
/// the benchmarks) serves it unchanged.
public final class ShmTransport: @unchecked Sendable {
    // The C side locks what it shares between threads; the handle itself never changes.
    private let handle: OpaquePointer
    public let socketPath: String
    public let channels: Int
    /// The socket file this transport bound (device, inode): the next VM's transport binds the same
    /// path, possibly before this one is released, and its socket must not be removed then.
    private let socketFile: (dev: UInt, ino: UInt)?
    /// Guest RAM's size when QEMU backs it with a shared memfd (VMSpec.sharedGuestMemory): zero
    /// copy then maps it (`guestMemory`). nil: no zero copy.
    public let guestRAMBytes: UInt64?
    private let memory = Mutex<(GuestMemory?, tried: Bool)>((nil, false))

    /// 2 MiB rings: each holds two messages of the largest msize the guest transport allows, so
    /// a reply never waits for the guest to empty the ring to be completed.
    public init(socketPath: String, channels: Int, ringSize: UInt32 = 2 << 20, guestRAMBytes: UInt64? = nil) throws {
        self.guestRAMBytes = guestRAMBytes
        var err = [CChar](repeating: 0, count: 512)
        guard let h = uvm_shm_create(socketPath, UInt32(channels), ringSize, &err, err.count) else {
            throw WireError(.internalError, "9P shared memory: \(String(cString: err))")
        }
        handle = h
        self.socketPath = socketPath
        self.channels = channels
        socketFile = Self.identity(socketPath)
    }

    deinit {
        uvm_shm_destroy(handle)
        if let mine = socketFile, let now = Self.identity(socketPath), now == mine {
            unlink(socketPath)
        }
    }

    private static func identity(_ path: String) -> (dev: UInt, ino: UInt)? {
        var st = stat()
        guard lstat(path, &st) == 0 else { return nil }
        return (UInt(st.st_dev), UInt(st.st_ino))
    }

    /// QEMU has connected and holds the region: the guest has the device.
    public var connected: Bool { uvm_shm_connected(handle) != 0 }

    /// The pid of the QEMU that connected, if any.
    public var qemuPID: pid_t? {
        let p = uvm_shm_qemu_pid(handle)
        return p > 0 ? p : nil
    }

    /// The guest's RAM mapped shared, for zero-copy 9P, or nil (not backed by a memfd, not found,
    /// or not as expected: then shares copy through the rings as before). Looked up once.
    public func guestMemory() -> GuestMemory? {
        memory.withLock { state in
            if state.tried { return state.0 }
            guard let size = guestRAMBytes, let pid = qemuPID else { return nil }  // retried once QEMU is there
            state.tried = true
            switch Self.mapGuestRAM(pid: pid, size: size) {
            case .success(let m): state.0 = m
            case .failure(let e): problem.withLock { $0 = e.message }
            }
            return state.0
        }
    }

    /// Why zero copy is off, for the log (nil when it is on or was not asked for).
    public var zeroCopyProblem: String? { problem.withLock { $0 } }
    private let problem = Mutex<String?>(nil)

    /// QEMU's guest-RAM memfd among its descriptors (/proc/PID/fd, which our own user may read: in
    /// qemu:///session QEMU runs as us): a memfd of exactly the RAM size, sealed against shrinking
    /// (our mapping would fault past a shrunk end). Opened through the magic link, mapped, closed.
    public static func mapGuestRAM(pid: pid_t, size: UInt64) -> Result<GuestMemory, WireError> {
        let dir = "/proc/\(pid)/fd"
        guard let d = opendir(dir) else {
            return .failure(WireError(.internalError, "cannot list \(dir): \(String(cString: strerror(errno)))"))
        }
        defer { closedir(d) }
        var seen: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            guard let n = Int32(name) else { continue }
            var buf = [CChar](repeating: 0, count: 256)
            let len = readlink("\(dir)/\(n)", &buf, buf.count - 1)
            guard len > 0 else { continue }
            let target = String(decoding: buf[0..<len].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            guard target.hasPrefix("/memfd:"), !target.hasPrefix("/memfd:uvm-9p") else { continue }
            seen.append(target)
            let fd = open("\(dir)/\(n)", O_RDWR | O_CLOEXEC)
            guard fd >= 0 else { continue }
            defer { close(fd) }
            var st = stat()
            guard fstat(fd, &st) == 0, UInt64(st.st_size) == size else { continue }
            let seals = fcntl(fd, 1034)  // F_GET_SEALS (not in Glibc's Swift overlay)
            guard seals >= 0, seals & 0x2 != 0 else {  // F_SEAL_SHRINK
                return .failure(WireError(.internalError, "guest RAM \(target) is not sealed against shrinking"))
            }
            do {
                return .success(try GuestMemory(fd: fd, ramSize: size))
            } catch {
                return .failure(WireError(.internalError, "cannot map guest RAM \(target): \(error)"))
            }
        }
        return .failure(WireError(.internalError, "no memfd of \(size) bytes among QEMU's descriptors (\(seen))"))
    }

    /// Resets `channel`'s rings and starts its pump; returns the socket the 9P server must serve.
    /// `zeroCopy`: the server takes Tzc requests, and the guest is told so.
    public func attach(channel: Int, zeroCopy: Bool = false) throws -> Int32 {
        var sv: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &sv) == 0 else {
            throw WireError(.internalError, "socketpair: \(String(cString: strerror(errno)))")
        }
        let flags = zeroCopy ? UInt32(UVM_SHM_HOST_ZC) : 0
        guard uvm_shm_attach_flags(handle, UInt32(channel), sv[1], flags) == 0 else {
            let why = String(cString: strerror(errno))
            close(sv[0])
            close(sv[1])
            throw WireError(.internalError, "9P shared-memory channel \(channel): \(why)")
        }
        return sv[0]
    }

    /// For tests, which play the guest: the region and a channel's doorbell and interrupt eventfds.
    var region: UnsafeMutableRawBufferPointer {
        var size = 0
        let base = uvm_shm_region(handle, &size)
        return UnsafeMutableRawBufferPointer(start: base, count: size)
    }
    func doorbellFD(_ channel: Int) -> Int32 { uvm_shm_doorbell_fd(handle, UInt32(channel)) }
    func interruptFD(_ channel: Int) -> Int32 { uvm_shm_interrupt_fd(handle, UInt32(channel)) }

    /// Stops the pump; requests the guest still has in flight on the channel fail.
    public func detach(channel: Int) {
        uvm_shm_detach(handle, UInt32(channel))
    }
}
