import Foundation
import Testing

@testable import Plan9

/// The standalone `uvm-9p` binary, when the build made it (it sits next to the test bundle).
@Suite("uvm-9p executable")
struct ExecutableTests {
    static let binary: String = {
        let dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        return dir.appendingPathComponent("uvm-9p").path
    }()

    static var available: Bool { FileManager.default.isExecutableFile(atPath: binary) }

    func serve(_ mode: [String], root: String, readOnly: Bool) async throws {
        let (mine, theirs) = try socketPair()
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.binary)
        p.arguments = ["serve", root, "--log-level", "error"] + (readOnly ? ["--read-only"] : [])
            + mode.map { $0 == "FD" ? "3" : $0 }
        let handle = FileHandle(fileDescriptor: theirs, closeOnDealloc: true)
        if mode == ["--stdio"] {
            p.standardInput = handle
            p.standardOutput = handle
        } else {
            // --fd 3: Process passes only 0-2, so make the socket fd 3 in the child via stdin and dup.
            p.executableURL = URL(fileURLWithPath: "/bin/sh")
            p.arguments = ["-c", "exec \"$0\" \"$@\" 3<&0 0</dev/null", Self.binary] + p.arguments!
            p.standardInput = handle
        }
        try p.run()
        try handle.close()
        defer { p.terminate(); p.waitUntilExit() }
        let c = try await Plan9Client.connect(socket: mine)
        #expect(try await c.version(msize: 65536) == 65536)
        try await c.attach(fid: 0)
        try await c.walk(0, 1, ["f"])
        try await c.lopen(1)
        #expect(try await c.read(1) == Array("served".utf8))
        try await c.walk(0, 2, [])
        await #expect(throws: P9Errno(readOnly ? EROFS : EEXIST)) { try await c.lcreate(2, "f", flags: 0o302) }
        await c.close()
    }

    @Test(.enabled(if: available, "uvm-9p is not built (swift build --product uvm-9p)")) func stdio() async throws {
        let fx = try Fixture { share, _ in try write(share + "/f", "served") }
        defer { Task { await fx.close() } }
        try await serve(["--stdio"], root: fx.share, readOnly: false)
    }

    @Test(.enabled(if: available, "uvm-9p is not built (swift build --product uvm-9p)")) func connectedFD() async throws {
        let fx = try Fixture { share, _ in try write(share + "/f", "served") }
        defer { Task { await fx.close() } }
        try await serve(["--fd", "FD"], root: fx.share, readOnly: true)
    }

    @Test(.enabled(if: available, "uvm-9p is not built (swift build --product uvm-9p)")) func unixSocket() async throws {
        let fx = try Fixture { share, _ in try write(share + "/f", "served") }
        defer { Task { await fx.close() } }
        let sock = fx.base + "/9p.sock"
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.binary)
        p.arguments = ["serve", fx.share, "--socket", sock, "--log-level", "error"]
        try p.run()
        defer { p.terminate(); p.waitUntilExit() }
        var client: Plan9Client?
        for _ in 0..<100 where client == nil {
            client = try? await Plan9Client.connect(unixSocketPath: sock)
            if client == nil { try await Task.sleep(nanoseconds: 50_000_000) }
        }
        let c = try #require(client)
        _ = try await c.version()
        try await c.attach(fid: 0)
        try await c.walk(0, 1, ["f"])
        try await c.lopen(1)
        #expect(try await c.read(1) == Array("served".utf8))
        await c.close()
    }
}
