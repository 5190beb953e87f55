import Synchronization

/// The frames of a session between the task reading them off the connection and the session's
/// body, bounded: when the body falls `limit` bytes behind, the reader stops reading, so the
/// stream's flow control (HTTP/2 windows, socket buffers) holds the sender back instead of our
/// memory growing. A forwarded upload to a slow guest server must not fill the guest's RAM.
/// One producer, one consumer.
final class FrameQueue: Sendable {
    private struct State {
        var frames: [Frame] = []
        var head = 0
        var bytes = 0
        var finished = false
        var discarding = false
        var consumer: CheckedContinuation<Frame?, Never>?
        var producer: CheckedContinuation<Void, Never>?
    }

    private let state = Mutex(State())
    let limit: Int

    init(limit: Int) { self.limit = limit }

    /// Hands `frame` on; waits while the consumer is more than `limit` bytes behind.
    func put(_ frame: Frame) async {
        let mustWait: Bool = state.withLock { s in
            if s.discarding || s.finished { return false }
            if let c = s.consumer {
                s.consumer = nil
                c.resume(returning: frame)
                return false
            }
            s.frames.append(frame)
            s.bytes += frame.payload.readableBytes
            return s.bytes > limit
        }
        guard mustWait else { return }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLock { s in
                    if s.discarding || s.bytes <= limit || Task.isCancelled { return true }
                    s.producer = c
                    return false
                }
                if resumeNow { c.resume() }
            }
        } onCancel: {
            state.withLock { s in
                let p = s.producer
                s.producer = nil
                return p
            }?.resume()
        }
    }

    /// No more frames: the consumer gets nil once it has taken the rest.
    func finish() {
        let c: CheckedContinuation<Frame?, Never>? = state.withLock { s in
            s.finished = true
            let c = s.consumer
            s.consumer = nil
            return c
        }
        c?.resume(returning: nil)
    }

    /// The consumer is gone for good: drop what is buffered and whatever comes, never block the reader.
    func discard() {
        let p: CheckedContinuation<Void, Never>? = state.withLock { s in
            s.discarding = true
            s.frames = []
            s.head = 0
            s.bytes = 0
            let p = s.producer
            s.producer = nil
            return p
        }
        p?.resume()
    }

    /// The next frame, or nil at the end (or when the consuming task is cancelled).
    func take() async -> Frame? {
        if let ready = takeBuffered() { return ready.frame }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Frame?, Never>) in
                let now: Frame?? = state.withLock { s in
                    if s.head < s.frames.count || s.finished || s.discarding || Task.isCancelled { return .some(nil) }
                    s.consumer = c
                    return nil
                }
                // Something arrived (or ended) between the first look and now: look again.
                if now != nil { c.resume(returning: takeBuffered()?.frame) }
            }
        } onCancel: {
            state.withLock { s in
                let c = s.consumer
                s.consumer = nil
                return c
            }?.resume(returning: nil)
        }
    }

    /// A buffered frame; nil when none is buffered and the queue is still open
    /// (`.some(nil)`-like end is signalled by `Ready(frame: nil)`).
    private struct Ready { var frame: Frame? }

    private func takeBuffered() -> Ready? {
        let (ready, producer): (Ready?, CheckedContinuation<Void, Never>?) = state.withLock { s in
            if s.head < s.frames.count {
                let f = s.frames[s.head]
                s.head += 1
                s.bytes -= f.payload.readableBytes
                if s.head == s.frames.count {
                    s.frames.removeAll(keepingCapacity: true)
                    s.head = 0
                }
                var p: CheckedContinuation<Void, Never>? = nil
                if s.bytes <= limit / 2 {
                    p = s.producer
                    s.producer = nil
                }
                return (Ready(frame: f), p)
            }
            if s.finished || s.discarding { return (Ready(frame: nil), nil) }
            return (nil, nil)
        }
        producer?.resume()
        return ready
    }
}
