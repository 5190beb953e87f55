import CSyscalls
import Foundation
import Testing

/// uvmd starts share servers and the distro copy with uvm_spawn_with_fds: the child must get its
/// three descriptors and none of uvmd's others (its sockets are not all close-on-exec).
@Suite struct SpawnTests {
    @Test func childrenGetTheirThreeDescriptorsAndNothingElse() throws {
        var leaked: [Int32] = [-1, -1]
        #expect(pipe(&leaked) == 0)  // no O_CLOEXEC, like NIO's accepted sockets
        defer { close(leaked[0]); close(leaked[1]) }
        var out: [Int32] = [-1, -1]
        #expect(pipe(&out) == 0)
        let args: [String] = ["sh", "-c", "ls /proc/$$/fd; echo from-stdin-$(cat)"]
        let argv: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        let pid = uvm_spawn_with_fds("/bin/sh", argv, -1, out[1], out[1])
        close(out[1])
        #expect(pid > 0)
        var text = ""
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(out[0], &buf, buf.count)
            if n <= 0 { break }
            text += String(decoding: buf[0..<n], as: UTF8.self)
        }
        close(out[0])
        var status: Int32 = -1
        waitpid(pid, &status, 0)
        let lines = text.split(separator: "\n").map(String.init)
        // The shell's own fds: 0 (/dev/null, so `cat` reads nothing), 1, 2; and nothing of ours.
        #expect(lines.last == "from-stdin-", "\(text)")
        let fds = Set(lines.dropLast().compactMap { Int32($0) })
        #expect(fds == [0, 1, 2], "\(text)")
        #expect(status == 0)
    }
}
