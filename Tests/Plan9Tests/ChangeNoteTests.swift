import Foundation
import NIOCore
import Testing

@testable import Plan9

/// The server's change notes for cache=meta guests (Tuvmnotify): every host-side change in a
/// directory the client has looked names up in is pushed; the client's own changes are not.
@Suite("Change notes")
struct ChangeNoteTests {
    /// Waits (bounded) until the notes gathered so far contain every one of `wanted`.
    private func notes(_ c: Plan9Client, containing wanted: [P9Note], within seconds: Double = 10) async throws -> [P9Note] {
        var got: [P9Note] = []
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            got += c.takeNotes()
            if wanted.allSatisfy(got.contains) { return got }
            try await Task.sleep(for: .milliseconds(20))
        }
        Issue.record("missing notes \(wanted.filter { !got.contains($0) }); got \(got)")
        return got
    }

    private func subscribe(_ c: Plan9Client) async throws {
        let r = try await c.call(.tuvmnotify(flags: 0))
        #expect(r == .ruvmnotify(notes: []))
    }

    private func qpath(_ path: String) throws -> UInt64 { UInt64(try lstatOf(path).st_ino) }

    @Test func hostChangesArePushed() async throws {
        let fx = try Fixture { share, _ in
            try FileManager.default.createDirectory(atPath: share + "/sub", withIntermediateDirectories: true)
            try write(share + "/old", "x")
        }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        try await subscribe(c)
        let root = try qpath(fx.share)
        let sub = try qpath(fx.share + "/sub")
        // A name looked up in sub (and missing) makes sub watched; the root is from the start.
        #expect(try await c.walk(0, 1, ["sub", "new"]).count == 1)

        try write(fx.share + "/new", "1")
        try write(fx.share + "/sub/new", "2")
        _ = try await notes(c, containing: [P9Note(.name, path: root, name: Array("new".utf8)),
                                            P9Note(.name, path: sub, name: Array("new".utf8))])
        #expect(chmod(fx.share + "/old", 0o600) == 0)
        _ = try await notes(c, containing: [P9Note(.attr, path: root, name: Array("old".utf8))])
        try FileManager.default.moveItem(atPath: fx.share + "/old", toPath: fx.share + "/sub/moved")
        _ = try await notes(c, containing: [P9Note(.name, path: root, name: Array("old".utf8)),
                                            P9Note(.name, path: sub, name: Array("moved".utf8))])
        #expect(unlink(fx.share + "/sub/new") == 0)
        _ = try await notes(c, containing: [P9Note(.name, path: sub, name: Array("new".utf8))])
        // The directory's own attributes.
        #expect(chmod(fx.share + "/sub", 0o700) == 0)
        _ = try await notes(c, containing: [P9Note(.attr, path: root, name: Array("sub".utf8))])
        #expect(chmod(fx.share, 0o750) == 0)
        _ = try await notes(c, containing: [P9Note(.selfAttr, path: root)])
    }

    @Test func theClientsOwnChangesAreNotEchoed() async throws {
        let fx = try Fixture(metadata: true)
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        try await subscribe(c)
        let root = try qpath(fx.share)
        // Through the client: create, write, chmod, mkdir, rename, unlink (with the events their host calls cause).
        try await c.walk(0, 1, [])
        try await c.lcreate(1, "mine")
        try await c.write(1, Array("data".utf8))
        var chmod = P9SetAttr()
        chmod.valid = P9.SetattrMask.mode
        chmod.mode = 0o600
        try await c.setattr(1, chmod)
        try await c.clunk(1)
        try await c.mkdir(0, "dir")
        try await c.call(.trenameat(olddirfid: 0, oldname: "mine", newdirfid: 0, newname: "renamed"))
        try await c.call(.tunlinkat(dirfid: 0, name: "renamed", flags: 0))
        // Then a host change: once its note is here, any echo of the client's would be too.
        try write(fx.share + "/host", "h")
        let got = try await notes(c, containing: [P9Note(.name, path: root, name: Array("host".utf8))])
        let echoed = got.filter { ["mine", "dir", "renamed"].contains(String(decoding: $0.name, as: UTF8.self)) }
        #expect(echoed.isEmpty, "the client's own changes came back: \(echoed)")
    }

    /// A cache=meta guest creates a name it has not looked up with Tuvmlcreate alone, no walk in
    /// that directory first, and then caches the entry: the directory is watched all the same,
    /// so a host rm of the new file, and a new host file beside it, are noted.
    @Test func aDirectoryCreatedInWithoutALookupIsWatched() async throws {
        let fx = try Fixture { share, _ in
            try FileManager.default.createDirectory(atPath: share + "/sub", withIntermediateDirectories: true)
        }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        try await subscribe(c)
        let sub = try qpath(fx.share + "/sub")
        try await c.walk(0, 1, ["sub"])  // looks "sub" up in the root: the root is watched, sub is not
        let excl = UInt32(O_RDWR | O_CREAT | O_EXCL)
        guard case .ruvmlcreate = try await c.call(.tuvmlcreate(dfid: 1, ofid: 2, pfid: 3, name: "made", flags: excl, mode: 0o644, gid: 0))
        else { Issue.record("no Ruvmlcreate"); return }
        try await Task.sleep(for: .milliseconds(300))  // past the create's own events
        #expect(unlink(fx.share + "/sub/made") == 0)
        try write(fx.share + "/sub/beside", "h")
        _ = try await notes(c, containing: [P9Note(.name, path: sub, name: Array("made".utf8)),
                                            P9Note(.name, path: sub, name: Array("beside".utf8))])
    }

    /// A cache=meta guest takes a directory it made for empty and answers lookups in it itself
    /// from then on: the server watches it from the Tmkdir on, with no lookup in it needed.
    @Test func aDirectoryTheClientMadeIsWatchedAtOnce() async throws {
        let fx = try Fixture()
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        try await subscribe(c)
        try await c.mkdir(0, "made")
        let made = try qpath(fx.share + "/made")
        try await Task.sleep(for: .milliseconds(300))  // past the mkdir's own events
        try write(fx.share + "/made/host", "h")
        _ = try await notes(c, containing: [P9Note(.name, path: made, name: Array("host".utf8))])
    }

    /// The client's own change is left out, but a host change to the same file right after it
    /// (nothing else happening in between) is still reported.
    @Test func aHostChangeAfterTheClientsOwnIsReported() async throws {
        let fx = try Fixture()
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        try await subscribe(c)
        try await c.walk(0, 1, [])
        try await c.lcreate(1, "f")
        try await c.write(1, Array("mine".utf8))
        try await c.clunk(1)
        try await Task.sleep(for: .milliseconds(300))
        #expect(chmod(fx.share + "/f", 0o600) == 0)
        _ = try await notes(c, containing: [P9Note(.attr, path: try qpath(fx.share), name: Array("f".utf8))])
    }

    @Test func aSessionThatDidNotAskGetsNothing() async throws {
        let fx = try Fixture()
        defer { Task { await fx.close() } }
        let quiet = try await fx.connect()
        let asking = try await fx.connect()
        try await subscribe(asking)
        _ = try? await quiet.walk(0, 1, ["nothing"])
        try write(fx.share + "/f", "x")
        _ = try await notes(asking, containing: [P9Note(.name, path: try qpath(fx.share), name: Array("f".utf8))])
        // Still answering, and nothing unsolicited arrived.
        #expect(try await quiet.walk(0, 2, ["f"]).count == 1)
        #expect(quiet.takeNotes().isEmpty)
    }

    @Test func directoriesBeyondTheWatchLimitAreAnnouncedUncached() async throws {
        var limits = SessionLimits()
        limits.watchedDirectories = 2  // the root and one more
        let fx = try Fixture(limits: limits) { share, _ in
            for d in ["a", "b", "c"] {
                try FileManager.default.createDirectory(atPath: share + "/" + d, withIntermediateDirectories: true)
            }
        }
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        try await subscribe(c)
        for d in ["a", "b", "c"] { _ = try? await c.walk(0, 1, [d, "x"]) }
        let b = try qpath(fx.share + "/b"), cc = try qpath(fx.share + "/c")
        _ = try await notes(c, containing: [P9Note(.uncached, path: b), P9Note(.uncached, path: cc)])
        // Announced once each, however often names are looked up in them.
        for _ in 0..<3 { _ = try? await c.walk(0, 1, ["b", "x"]) }
        try write(fx.share + "/a/x", "x")  // a is watched: its note marks the end of what was sent
        let more = try await notes(c, containing: [P9Note(.name, path: try qpath(fx.share + "/a"), name: Array("x".utf8))])
        #expect(!more.contains(P9Note(.uncached, path: b)))
    }

    @Test func theWatcherStopsWithTheLastSession() async throws {
        let fx = try Fixture()
        defer { Task { await fx.close() } }
        let c = try await fx.connect()
        try await subscribe(c)
        #expect(fx.server.core.hasChangeWatcher)
        await c.close()
        let deadline = Date().addingTimeInterval(10)
        while fx.server.core.hasChangeWatcher && Date() < deadline { try await Task.sleep(for: .milliseconds(20)) }
        #expect(!fx.server.core.hasChangeWatcher)
    }
}
