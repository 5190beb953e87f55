import CSyscalls
import Glibc
import Synchronization

/// uvm-init is PID 1: every orphan in the VM ends up as its child. One thread reaps them all with
/// waitpid(-1) and hands each status to whoever waits for that pid; a status that arrives before
/// anyone waits (a process that exits at once) is kept until it is claimed.
package final class ChildReaper: Sendable {
    package static let shared = ChildReaper()

    private struct State {
        var waiters: [pid_t: CheckedContinuation<Int32, Never>] = [:]
        var unclaimed: [pid_t: Int32] = [:]
        var ignored: Set<pid_t> = []
    }
    private let state = Mutex(State())
    // The thread sleeps on this pipe when there is no child at all (waitpid says ECHILD). Only
    // that sleep drains it, so while any child lives (an instance's init) nothing reads it: the
    // write end is non-blocking, and a full pipe already holds the wake-up a write would add.
    private let pipe: (read: Int32, write: Int32)

    private init() {
        var fds: [Int32] = [0, 0]
        precondition(uvm_pipe_cloexec(&fds) == 0, "pipe2 failed")
        precondition(fcntl(fds[1], F_SETFL, fcntl(fds[1], F_GETFL) | O_NONBLOCK) == 0, "cannot make the wake-up pipe non-blocking")
        self.pipe = (fds[0], fds[1])
        var thread = pthread_t()
        let unmanaged = Unmanaged.passRetained(self)
        let rc = pthread_create(&thread, nil, { arg in
            let reaper = Unmanaged<ChildReaper>.fromOpaque(arg!).takeRetainedValue()
            reaper.loop()
            return nil
        }, unmanaged.toOpaque())
        precondition(rc == 0, "cannot start the reaper thread")
    }

    /// Call after starting a child so that a reaper idling on ECHILD looks again. Never blocks.
    package func childStarted() {
        var b: UInt8 = 1
        _ = Glibc.write(pipe.write, &b, 1)  // EAGAIN: a wake-up is pending already
    }

    /// A child whose status nobody wants (the short-lived spawn helper, a child that failed before exec).
    func ignore(_ pid: pid_t) {
        state.withLock { s in
            if s.unclaimed.removeValue(forKey: pid) == nil { s.ignored.insert(pid) }
        }
    }

    /// The raw wait status of `pid`, once it has exited.
    package func wait(for pid: pid_t) async -> Int32 {
        await withCheckedContinuation { (c: CheckedContinuation<Int32, Never>) in
            let done: Int32? = state.withLock { s in
                if let st = s.unclaimed.removeValue(forKey: pid) { return st }
                s.waiters[pid] = c
                return nil
            }
            if let done { c.resume(returning: done) }
        }
    }

    /// How many pids the reaper keeps something for; stays small however many children come and go.
    package var bookkeeping: (waiters: Int, unclaimed: Int, ignored: Int) {
        state.withLock { ($0.waiters.count, $0.unclaimed.count, $0.ignored.count) }
    }

    private func loop() {
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            var status: Int32 = 0
            let pid = waitpid(-1, &status, 0)
            if pid > 0 {
                let waiter: CheckedContinuation<Int32, Never>? = state.withLock { s in
                    if s.ignored.remove(pid) != nil { return nil }
                    if let w = s.waiters.removeValue(forKey: pid) { return w }
                    s.unclaimed[pid] = status
                    return nil
                }
                waiter?.resume(returning: status)
            } else if errno == ECHILD {
                // One read takes every pending wake-up (64 KiB is a full pipe): a child started
                // after this read writes again, one started before it is seen by waitpid.
                _ = Glibc.read(pipe.read, &buf, buf.count)
            }
        }
    }
}

