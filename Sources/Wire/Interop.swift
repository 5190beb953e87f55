/// Interop: `uvm-host CMD` in a session runs CMD on the host, as the user who started the session
/// ([interop] enabled; off by default, the guest being untrusted). The agent, which received the
/// command's stdio descriptors on the session's own socket, sends a `hostRun` frame on that exec
/// session's stream; uvmd runs the program and opens an `interopAttach` stream to the agent for its
/// stdio: `stdout`/`stderr` frames (uvmd -> agent) go to the command's descriptors, `stdin`,
/// `stdinEOF` and `signal` frames (agent -> uvmd) come from them, and an `exit` frame ends it.
public struct HostRunRequest: Codable, Sendable, Equatable {
    /// Names the waiting command in the agent (random, unguessable).
    public var id: String
    public var argv: [String]
    /// The command's working directory in the guest; inside a share, the program starts in the
    /// matching host folder, else in the user's home.
    public var cwd: String
    public init(id: String, argv: [String], cwd: String) { (self.id, self.argv, self.cwd) = (id, argv, cwd) }
}

public struct InteropAttachRequest: Codable, Sendable, Equatable {
    public var id: String
    public init(id: String) { self.id = id }
}
