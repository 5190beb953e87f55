import NIOCore

extension NIOAsyncChannelOutboundWriter where OutboundOut == ByteBuffer {
    /// Half-closes the output once everything written so far has left for the socket or pipe.
    /// `finish()` alone half-closes at once, and NIO then fails the writes still pending in the
    /// channel: a slow reader behind a forwarded port (or a slow process's stdin) lost the tail
    /// of the stream (19,278,456 of 20,000,000 bytes in NetworkTests). An empty write completes
    /// only after every earlier one, so waiting for it first is enough.
    public func finish(after channel: Channel) async {
        try? await channel.writeAndFlush(ByteBuffer()).get()
        finish()
    }
}
