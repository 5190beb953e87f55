#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import NIOConcurrencyHelpers
import NIOCore
import Wire

/// What the stream to uvmd said besides 9P bytes: whom the guest serves as, and why it ended.
final class StreamNotes: Sendable {
    private let state = NIOLockedValueBox<(ready: ServeFilesReady?, failure: String?)>((nil, nil))
    var ready: ServeFilesReady? { state.withLockedValue { $0.ready } }
    var failure: String? { state.withLockedValue { $0.failure } }
    func set(ready: ServeFilesReady) { state.withLockedValue { $0.ready = ready } }
    func set(failure: String) { state.withLockedValue { if $0.failure == nil { $0.failure = failure } } }
}

/// uvmd's session frames <-> a plain 9P byte stream, below Plan9Client's handlers: sends the
/// `files` request when the connection is up, then 9P bytes as `stdin` frames, and hands on the
/// payload of `stdout` frames. An `error` or `exit` frame ends the connection (its reason noted).
final class FrameBridge: ChannelDuplexHandler {
    typealias InboundIn = Frame
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = Frame

    private let request: DaemonRequest
    private let notes: StreamNotes

    init(request: DaemonRequest, notes: StreamNotes) {
        self.request = request
        self.notes = notes
    }

    func channelActive(context: ChannelHandlerContext) {
        context.writeAndFlush(wrapOutboundOut(.json(.request, request)), promise: nil)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch frame.kind {
        case .stdout:
            context.fireChannelRead(wrapInboundOut(frame.payload))
        case .event:
            if let ready = try? frame.decode(ServeFilesReady.self) { notes.set(ready: ready) }
        case .progress:
            break  // the VM booting: the first operation simply waits
        case .error:
            notes.set(failure: (try? frame.decode(WireError.self))?.message ?? "uvmd ended the session")
            context.close(promise: nil)
        case .exit:
            notes.set(failure: "the guest ended the session")
            context.close(promise: nil)
        default:
            notes.set(failure: "protocol error: unexpected \(frame.kind) frame from uvmd")
            context.close(promise: nil)
        }
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        context.write(wrapOutboundOut(Frame(.stdin, unwrapOutboundIn(data))), promise: promise)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        notes.set(failure: "\(error)")
        context.close(promise: nil)
    }
}
