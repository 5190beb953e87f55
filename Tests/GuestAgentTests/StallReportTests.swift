import Foundation
import Glibc
import Synchronization
import Testing

@testable import GuestAgent

/// What the agent logs when it stops making progress: each thread with its state and system call
/// (and its kernel stack, which only root may read).
@Suite struct StallReportTests {
    @Test func eachThreadIsDescribedWithItsSystemCall() async throws {
        var fds: [Int32] = [-1, -1]
        try #require(pipe(&fds) == 0)
        defer { close(fds[0]); close(fds[1]) }
        let tid = Atomic<Int32>(0)
        let reader = fds[0]
        let thread = Thread {
            // Its own thread id: /proc/thread-self is PID/task/TID.
            let me = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/thread-self")) ?? ""
            tid.store(Int32(me.split(separator: "/").last ?? "") ?? -1, ordering: .releasing)
            var b: UInt8 = 0
            _ = read(reader, &b, 1)
        }
        thread.start()
        defer { var b: UInt8 = 1; _ = write(fds[1], &b, 1) }
        // Until it sleeps in read(2): syscall number 0 on x86-64.
        var line: String?
        let deadline = Date().addingTimeInterval(10)
        while line == nil, Date() < deadline {
            let id = tid.load(ordering: .acquiring)
            if id != 0 {
                line = StallReport.describe().first { $0.hasPrefix("thread \(id) ") && $0.contains(" state S syscall 0 ") }
            }
            if line == nil { try await Task.sleep(for: .milliseconds(20)) }
        }
        let id = tid.load(ordering: .acquiring)
        let lines = StallReport.describe()
        #expect(line != nil, "\(lines.joined(separator: "\n"))")
        // Root reads kernel stacks: the blocked thread's follows its line.
        if getuid() == 0, let at = lines.firstIndex(where: { $0.hasPrefix("thread \(id) ") }) {
            #expect(lines.count > at + 1 && lines[at + 1].hasPrefix("  ["), "no stack after \(lines[at]): \(lines)")
        }
    }
}
