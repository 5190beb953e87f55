import Dispatch
import Glibc
import NIOCore
import Synchronization
import Wire

/// Runs a blocking call on a thread of its own and waits for it `within` at most; true when it
/// finished. For calls that can block forever in the kernel: once a 9P server is gone (uvmd was
/// killed; the one that adopts the VM cannot reach the old shared memory), tearing its mount down
/// waits for answers that never come, and sync() then waits behind that mount. Such a call is
/// left to itself (its thread stays blocked) and the agent goes on.
func onOwnThread(within limit: Duration, _ what: String, _ body: @escaping @Sendable () -> Void) async -> Bool {
    final class Call: @unchecked Sendable {
        let body: @Sendable () -> Void
        let done = Atomic<Bool>(false)
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
    let call = Call(body)
    var thread = pthread_t()
    let started = pthread_create(&thread, nil, { arg in
        let call = Unmanaged<Call>.fromOpaque(arg!).takeRetainedValue()
        call.body()
        call.done.store(true, ordering: .releasing)
        return nil
    }, Unmanaged.passRetained(call).toOpaque())
    guard started == 0 else {
        body()
        return true
    }
    pthread_detach(thread)
    let deadline = ContinuousClock.now + limit
    while !call.done.load(ordering: .acquiring) {
        if ContinuousClock.now >= deadline {
            log("\(what) does not finish within \(limit) (a 9P server that is gone?): left behind")
            return false
        }
        try? await Task.sleep(for: .milliseconds(10))
    }
    return true
}

/// sync(), bounded (see `onOwnThread`). While an earlier one is still blocked, another would only
/// block behind it: skipped.
func boundedSync() async {
    guard syncRunning.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged else { return }
    _ = await onOwnThread(within: .seconds(5), "sync") {
        sync()
        syncRunning.store(false, ordering: .releasing)
    }
}
private let syncRunning = Atomic<Bool>(false)

private final class ThreadWork: @unchecked Sendable {
    let run: () -> Void
    init(_ run: @escaping () -> Void) { self.run = run }
}

/// Runs `body` on a new thread and waits for it, however long: for long blocking work (a `uvm cp`
/// of a large tree) that must not hold one of the few thread-pool threads.
func onOwnThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { (k: CheckedContinuation<T, any Error>) in
        let work = ThreadWork { k.resume(with: Result { try body() }) }
        var thread = pthread_t()
        let arg = Unmanaged.passRetained(work).toOpaque()
        let rc = pthread_create(&thread, nil, { arg in
            Unmanaged<ThreadWork>.fromOpaque(arg!).takeRetainedValue().run()
            return nil
        }, arg)
        if rc == 0 {
            pthread_detach(thread)
        } else {
            Unmanaged<ThreadWork>.fromOpaque(arg).release()
            k.resume(throwing: WireError(.internalError, "cannot start a thread: \(String(cString: strerror(rc)))"))
        }
    }
}

/// Starts `body` on a detached thread of its own (a blocking accept or receive).
func startThread(_ body: @escaping @Sendable () -> Void) {
    var thread = pthread_t()
    let arg = Unmanaged.passRetained(ThreadWork(body)).toOpaque()
    if pthread_create(&thread, nil, { arg in
        Unmanaged<ThreadWork>.fromOpaque(arg!).takeRetainedValue().run()
        return nil
    }, arg) == 0 {
        pthread_detach(thread)
    } else {
        Unmanaged<ThreadWork>.fromOpaque(arg).release()
    }
}

/// Writes a frame from a plain thread, waiting for the stream to take it (its flow control is
/// what holds a fast producer back: a `uvm cp` archive, `uvm-host` input). A closed stream (the
/// other side went away) throws.
func writeBlocking(_ frame: Frame, _ outbound: NIOAsyncChannelOutboundWriter<Frame>) throws {
    let done = DispatchSemaphore(value: 0)
    let failure = Mutex<(any Error)?>(nil)
    Task {
        do { try await outbound.write(frame) } catch { failure.withLock { $0 = error } }
        done.signal()
    }
    done.wait()
    if let e = failure.withLock({ $0 }) { throw e }
}
