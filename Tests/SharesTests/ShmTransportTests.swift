import CShmRing
import CSyscalls
import Foundation
@testable import Shares
import Testing

/// The host end of the shared-memory 9P transport, with the test playing QEMU (the ivshmem server
/// protocol) and the guest kernel (the rings). The VM tests cover the real guest driver.
@Suite struct ShmTransportTests {
    let dir = NSTemporaryDirectory() + "uvm-shm-\(UUID().uuidString)"
    init() throws { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) }

    /// The guest's view of one channel.
    struct Guest {
        let region: UnsafeMutableRawBufferPointer
        let channel: Int
        let ring: Int
        func u32(_ offset: Int) -> UInt32 { region.load(fromByteOffset: offset, as: UInt32.self) }
        func set(_ offset: Int, _ v: UInt32) { region.storeBytes(of: v, toByteOffset: offset, as: UInt32.self) }
        var ctl: Int { UVM_SHM_CTL + UVM_SHM_CTL_STRIDE * channel }
        var reqRing: Int { UVM_SHM_DATA + 2 * ring * channel }
        var repRing: Int { reqRing + ring }

        /// Writes `bytes` into the request ring (wrapping) and publishes them.
        func send(_ bytes: [UInt8]) {
            let head = u32(ctl)
            for (i, b) in bytes.enumerated() { region[reqRing + (Int(head) + i) % ring] = b }
            set(ctl, head &+ UInt32(bytes.count))
        }
        /// Takes what the host put in the reply ring.
        func receive() -> [UInt8] {
            let head = u32(ctl + 128), tail = u32(ctl + 192)
            let n = Int(head &- tail)
            let out = (0..<n).map { region[repRing + (Int(tail) + $0) % ring] }
            set(ctl + 192, head)
            return out
        }
        var hostClosed: Bool { u32(ctl + 224) != 0 }
        /// The guest kernel's flag: a caller is watching the reply ring itself.
        func polling(_ on: Bool) { set(ctl + 232, on ? 1 : 0) }
        var replyHead: UInt32 { u32(ctl + 128) }
    }

    static func ring(_ fd: Int32) {
        var one: UInt64 = 1
        _ = write(fd, &one, 8)
    }

    static func wait(_ fd: Int32, seconds: Int32 = 10) -> Bool { wait(fd, milliseconds: seconds * 1000) }

    static func wait(_ fd: Int32, milliseconds: Int32) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, milliseconds) == 1 else { return false }
        var v: UInt64 = 0
        _ = read(fd, &v, 8)
        return true
    }

    static func readAll(_ fd: Int32, count: Int) -> [UInt8] {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while out.count < count {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 10_000) == 1 else { break }
            let n = read(fd, &buf, min(buf.count, count - out.count))
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return out
    }

    @Test func bytesGoBothWaysThroughWrappingRings() throws {
        let t = try ShmTransport(socketPath: dir + "/shm.sock", channels: 2, ringSize: 4096)
        let server = try t.attach(channel: 1)
        defer { close(server) }
        let guest = Guest(region: t.region, channel: 1, ring: 4096)
        #expect(guest.u32(0) == UInt32(UVM_SHM_MAGIC) && guest.u32(12) == 4096)
        #expect(!guest.hostClosed)
        // 10 rounds of 1000 bytes: the 4 KiB rings wrap twice in each direction.
        for round in 0..<10 {
            let request = (0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ round) }
            guest.send(request)
            Self.ring(t.doorbellFD(1))
            #expect(Self.readAll(server, count: 1000) == request)
            let reply = request.reversed() as [UInt8]
            _ = reply.withUnsafeBytes { write(server, $0.baseAddress, $0.count) }
            var got: [UInt8] = []
            while got.count < 1000, Self.wait(t.interruptFD(1)) { got += guest.receive() }
            #expect(got == reply)
        }
        // The server going away closes the channel for the guest, and interrupts it to say so.
        close(server)
        #expect(Self.wait(t.interruptFD(1)))
        #expect(try Self.until { guest.hostClosed })
    }

    /// A guest caller that watches the reply ring takes its reply without the interrupt, which
    /// under emulation is most of a round trip: the host does not send one while the guest says
    /// it is watching, and does again once it stops.
    @Test func aGuestWatchingForItsReplyIsNotInterrupted() throws {
        let t = try ShmTransport(socketPath: dir + "/shm.sock", channels: 1, ringSize: 4096)
        let server = try t.attach(channel: 0)
        defer { close(server) }
        let guest = Guest(region: t.region, channel: 0, ring: 4096)
        for watching in [true, false, true] {
            guest.polling(watching)
            let before = guest.replyHead
            guest.send([1, 2, 3])
            Self.ring(t.doorbellFD(0))
            #expect(Self.readAll(server, count: 3) == [1, 2, 3])
            _ = [UInt8](arrayLiteral: 4, 5).withUnsafeBytes { write(server, $0.baseAddress, $0.count) }
            #expect(try Self.until { guest.replyHead == before &+ 2 })
            // The kick follows the index at once when there is one; 300 ms is long past it.
            #expect(Self.wait(t.interruptFD(0), milliseconds: watching ? 300 : 10_000) == !watching)
            #expect(guest.receive() == [4, 5])
        }
    }

    /// Issue 10: the next VM's transport binds the same path while the previous one may still be
    /// on its way out; releasing the previous one removed the new socket, and QEMU then could not
    /// reach its shared memory.
    @Test func releasingATransportLeavesTheNextOnesSocketAlone() throws {
        let path = dir + "/shm.sock"
        var old: ShmTransport? = try ShmTransport(socketPath: path, channels: 1, ringSize: 4096)
        let next = try ShmTransport(socketPath: path, channels: 1, ringSize: 4096)
        var before = stat()
        #expect(lstat(path, &before) == 0)
        old = nil
        var after = stat()
        #expect(lstat(path, &after) == 0, "the next transport's socket was removed")
        #expect(after.st_ino == before.st_ino)
        withExtendedLifetime(next) {}
        _ = old
    }

    @Test func releasingATransportRemovesItsOwnSocket() throws {
        let path = dir + "/shm.sock"
        var t: ShmTransport? = try ShmTransport(socketPath: path, channels: 1, ringSize: 4096)
        #expect(access(path, F_OK) == 0)
        t = nil
        _ = t
        #expect(access(path, F_OK) != 0)
    }

    @Test func aGuestThatBreaksTheRingIndicesLosesTheChannelOnly() throws {
        let t = try ShmTransport(socketPath: dir + "/shm.sock", channels: 2, ringSize: 4096)
        let bad = try t.attach(channel: 0), good = try t.attach(channel: 1)
        defer { close(bad); close(good) }
        let g0 = Guest(region: t.region, channel: 0, ring: 4096)
        // More bytes "written" than the ring holds: the host must not read past the ring.
        g0.set(g0.ctl, 4096 * 3)
        Self.ring(t.doorbellFD(0))
        var buf = [UInt8](repeating: 0, count: 16)
        var p = pollfd(fd: bad, events: Int16(POLLIN), revents: 0)
        #expect(poll(&p, 1, 10_000) == 1)
        #expect(read(bad, &buf, 16) == 0)  // EOF: nothing was passed on
        #expect(try Self.until { g0.hostClosed })
        // The other channel still works.
        let g1 = Guest(region: t.region, channel: 1, ring: 4096)
        g1.send([9, 0, 0, 0, 100, 1, 0, 42, 42])
        Self.ring(t.doorbellFD(1))
        #expect(Self.readAll(good, count: 9) == [9, 0, 0, 0, 100, 1, 0, 42, 42])
        // Attaching again resets the channel.
        let again = try t.attach(channel: 0)
        defer { close(again) }
        #expect(!g0.hostClosed && g0.u32(g0.ctl) == 0)
    }

    /// Zero copy: the guest learns from the channel's control block (+228, host flags) whether to
    /// send Tzc requests; it reads it when it mounts, after attach.
    @Test func attachTellsTheGuestWhetherTheServerTakesZeroCopy() throws {
        let t = try ShmTransport(socketPath: dir + "/shm.sock", channels: 2, ringSize: 4096)
        let zc = try t.attach(channel: 0, zeroCopy: true)
        let plain = try t.attach(channel: 1)
        defer { close(zc); close(plain) }
        #expect(Guest(region: t.region, channel: 0, ring: 4096).u32(UVM_SHM_CTL + 228) == UInt32(UVM_SHM_HOST_ZC))
        #expect(Guest(region: t.region, channel: 1, ring: 4096).u32(UVM_SHM_CTL + UVM_SHM_CTL_STRIDE + 228) == 0)
        // Attached again without it (a share re-exported): the flag goes.
        let again = try t.attach(channel: 0)
        defer { close(again) }
        #expect(Guest(region: t.region, channel: 0, ring: 4096).u32(UVM_SHM_CTL + 228) == 0)
    }

    /// A client socket connected to `path` (as QEMU connects to the ivshmem server), and connect's result.
    static func connectUnix(_ path: String) -> (Int32, Int32) {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        return (fd, rc)
    }

    /// QEMU's pid comes from its connection (SO_PEERCRED); its guest RAM is the memfd of the RAM's
    /// size among its descriptors, and only if sealed against shrinking. The test plays QEMU.
    @Test func guestRAMIsFoundThroughQEMUsPidAndMustBeSealed() throws {
        let t = try ShmTransport(socketPath: dir + "/shm.sock", channels: 1, ringSize: 4096, guestRAMBytes: 3 << 20 + 8192)
        #expect(t.qemuPID == nil && t.guestMemory() == nil)
        let (fd, _) = Self.connectUnix(t.socketPath)
        defer { close(fd) }
        #expect(try Self.until { t.qemuPID == getpid() })
        let size = 3 << 20 + 8192
        // Unsealed: refused. Sealed: mapped, the same memory.
        let loose = uvm_memfd_create("memory-backend-memfd", 1 /* MFD_CLOEXEC */)
        defer { close(loose) }
        ftruncate(loose, off_t(size))
        guard case .failure(let e) = ShmTransport.mapGuestRAM(pid: getpid(), size: UInt64(size)) else {
            Issue.record("an unsealed memfd was taken")
            return
        }
        #expect(e.message.contains("not sealed"))
        close(loose)
        let ram = uvm_memfd_create("memory-backend-memfd", 1 | 2 /* MFD_CLOEXEC, MFD_ALLOW_SEALING */)
        defer { close(ram) }
        ftruncate(ram, off_t(size))
        #expect(fcntl(ram, 1033 /* F_ADD_SEALS */, 0x2 | 0x4 /* SHRINK, GROW */) == 0)
        #expect(pwrite(ram, "guest", 5, off_t(size - 4096)) == 5)
        let m = try #require(t.guestMemory())
        #expect(m.size == UInt64(size))
        #expect(String(decoding: UnsafeRawBufferPointer(start: m.base + (size - 4096), count: 5), as: UTF8.self) == "guest")
    }

    @Test func qemuGetsTheRegionAndEventfdsInTheServerProtocolOrder() throws {
        let t = try ShmTransport(socketPath: dir + "/shm.sock", channels: 3, ringSize: 1 << 20)
        let (fd, rc) = Self.connectUnix(t.socketPath)
        defer { close(fd) }
        #expect(rc == 0)
        var messages: [(Int64, Int32)] = []
        for _ in 0..<(3 + 2 * 3) { messages.append(try Self.receiveMessage(fd)) }
        #expect(messages.map(\.0) == [0, 1, -1, 0, 0, 0, 1, 1, 1])
        #expect(messages.prefix(2).allSatisfy { $0.1 < 0 })
        #expect(messages.dropFirst(2).allSatisfy { $0.1 >= 0 })
        var st = stat()
        fstat(messages[2].1, &st)
        #expect(st.st_size == 8 << 20)  // 64 KiB + 6 MiB of rings, up to a power of two
        #expect(try Self.until { t.connected })
        // Ringing peer 0's vector 2 (QEMU writes that fd on a Doorbell write) is channel 2's doorbell.
        Self.ring(messages[5].1)
        #expect(Self.wait(t.doorbellFD(2)))
        messages.forEach { if $0.1 >= 0 { close($0.1) } }
    }

    static func receiveMessage(_ fd: Int32) throws -> (Int64, Int32) {
        var value: Int64 = 0
        var control = [UInt8](repeating: 0, count: 64)
        var received: Int32 = -1
        let n = withUnsafeMutableBytes(of: &value) { v in
            control.withUnsafeMutableBytes { c in
                var iov = iovec(iov_base: v.baseAddress, iov_len: 8)
                return withUnsafeMutablePointer(to: &iov) { iovp in
                    var msg = msghdr()
                    msg.msg_iov = iovp
                    msg.msg_iovlen = 1
                    msg.msg_control = c.baseAddress
                    msg.msg_controllen = c.count
                    let n = recvmsg(fd, &msg, 0)
                    if n > 0, msg.msg_controllen >= MemoryLayout<cmsghdr>.size {
                        let cm = c.baseAddress!.assumingMemoryBound(to: cmsghdr.self)
                        if cm.pointee.cmsg_type == SCM_RIGHTS {
                            received = c.load(fromByteOffset: MemoryLayout<cmsghdr>.size, as: Int32.self)
                        }
                    }
                    return n
                }
            }
        }
        guard n == 8 else { throw POSIXError(.EIO) }
        return (Int64(littleEndian: value), received)
    }

    static func until(_ condition: () -> Bool) throws -> Bool {
        for _ in 0..<200 {
            if condition() { return true }
            usleep(50_000)
        }
        return false
    }
}
