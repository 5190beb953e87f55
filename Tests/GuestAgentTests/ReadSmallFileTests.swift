import Foundation
import Glibc
import Testing

@testable import GuestAgent

/// readSmallFile reads files in a distro's file system (its /etc/passwd, /etc/group,
/// /etc/uvm.conf), which the guest may have made anything.
@Suite struct ReadSmallFileTests {
    /// A FIFO without a writer reads as empty at once. It used to block the open for ever: an
    /// `uvm exec` as the default user of a distro whose /etc/uvm.conf was a FIFO held a thread of
    /// the agent's two-thread cooperative pool, and two of them stopped the agent.
    @Test(.timeLimit(.minutes(1))) func aFIFODoesNotWait() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("uvm-fifo-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let fifo = dir + "/uvm.conf"
        try #require(mkfifo(fifo, 0o644) == 0)
        #expect(readSmallFile(fifo) == "")
        // A regular file still reads whole, and a missing one is nil.
        try "[user]\ndefault = u\n".write(toFile: dir + "/f", atomically: true, encoding: .utf8)
        #expect(readSmallFile(dir + "/f") == "[user]\ndefault = u\n")
        #expect(readSmallFile(dir + "/missing") == nil)
    }
}
