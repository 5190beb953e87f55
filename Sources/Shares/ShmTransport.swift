import CShmRing
import Glibc
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

    /// 2 MiB rings: each holds two messages of the largest msize the guest transport allows, so
    /// a reply never waits for the guest to empty the ring to be completed.
    public init(socketPath: String, channels: Int, ringSize: UInt32 = 2 << 20) throws {
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

    /// Resets `channel`'s rings and starts its pump; returns the socket the 9P server must serve.
    public func attach(channel: Int) throws -> Int32 {
        var sv: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &sv) == 0 else {
            throw WireError(.internalError, "socketpair: \(String(cString: strerror(errno)))")
        }
        guard uvm_shm_attach(handle, UInt32(channel), sv[1]) == 0 else {
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
