import CSyscalls
import Foundation
import Glibc
import Testing

@testable import Archive

/// `uvm cp`'s two ends without the VM: cp's destination rules, the names an archive may hold,
/// owners and modes on arrival, and paths resolved beneath a distro's root.
@Suite struct CopyTests {
    func write(_ path: String, _ text: String, mode: mode_t = 0o644) throws {
        try Data(text.utf8).write(to: URL(fileURLWithPath: path))
        chmod(path, mode)
    }

    func read(_ path: String) -> String? { try? String(contentsOfFile: path, encoding: .utf8) }

    /// What `CopyPaths.send` makes of `sources`.
    func tar(_ sources: [String], root: CopyRoot = .host, recursive: Bool) throws -> [UInt8] {
        var out: [UInt8] = []
        let w = TarWriter(bufferSize: 64 << 10) { out.append(contentsOf: $0) }
        try CopyPaths.send(sources, root: root, recursive: recursive, to: w)
        try w.finish()
        return out
    }

    /// Received as the other end of `uvm cp` does.
    @discardableResult
    func receive(_ bytes: [UInt8], at dest: String, names: [String], root: CopyRoot = .host,
                 options: ExtractOptions = ExtractOptions()) throws -> ExtractStats {
        let placed = try CopyPaths.destination(dest, names: names, root: root)
        var options = options
        options.topLevelNames = placed.names
        let x = TarExtractor(destinationFD: placed.fd, options: options)
        try bytes.withUnsafeBytes { try x.feed($0) }
        return try x.finish()
    }

    @Test func splitNamesTheLastComponent() {
        #expect(CopyPaths.split("a/b/c")! == ("a/b", "c"))
        #expect(CopyPaths.split("a/b/c//")! == ("a/b", "c"))
        #expect(CopyPaths.split("c")! == (".", "c"))
        #expect(CopyPaths.split("/c")! == ("/", "c"))
        for none in ["/", "", ".", "..", "a/..", "a/.", "//"] { #expect(CopyPaths.split(none) == nil, "\(none)") }
    }

    @Test func aFolderDestinationReceivesUnderTheSourcesNames() throws {
        let t = TempDir("copy")
        let src = t.sub("src"), dst = t.sub("dst")
        try write(src + "/a", "A")
        _ = t.sub("src/d")
        try write(src + "/d/x", "X")
        symlink("a", src + "/d/link")
        try receive(try tar([src + "/a", src + "/d"], recursive: true), at: dst, names: ["a", "d"])
        #expect(read(dst + "/a") == "A")
        #expect(read(dst + "/d/x") == "X")
        var st = stat()
        #expect(lstat(dst + "/d/link", &st) == 0 && st.st_mode & S_IFMT == S_IFLNK, "-r copies symlinks as links")
    }

    @Test func anyOtherDestinationIsTheOneSourcesNewName() throws {
        let t = TempDir("copy")
        let src = t.sub("src"), dst = t.sub("dst")
        try write(src + "/a", "A")
        try receive(try tar([src + "/a"], recursive: false), at: dst + "/renamed", names: ["a"])
        #expect(read(dst + "/renamed") == "A")
        #expect(!FileManager.default.fileExists(atPath: dst + "/a"))
        // An existing file is overwritten, as cp does.
        try write(src + "/a", "B")
        try receive(try tar([src + "/a"], recursive: false), at: dst + "/renamed", names: ["a"])
        #expect(read(dst + "/renamed") == "B")
        // A folder too, under its new name.
        _ = t.sub("src/d")
        try write(src + "/d/x", "X")
        try receive(try tar([src + "/d"], recursive: true), at: dst + "/newdir", names: ["d"])
        #expect(read(dst + "/newdir/x") == "X")
    }

    @Test func destinationsCpRefuses() throws {
        let t = TempDir("copy")
        let dst = t.sub("dst")
        try write(dst + "/file", "F")
        let cases: [(String, [String], String)] = [
            (dst + "/missing", ["a", "b"], "no such directory (copying 2 items"),
            (dst + "/file", ["a", "b"], "not a directory (copying 2 items"),
            (dst + "/missing/", ["a"], "no such directory"),
            (dst + "/missing/deeper", ["a"], "No such file"),
        ]
        for (dest, names, message) in cases {
            let e = #expect(throws: ArchiveError.self) { try CopyPaths.destination(dest, names: names, root: .host) }
            #expect(e?.description.contains(message) == true, "\(dest): \(e.map { "\($0)" } ?? "none")")
        }
    }

    @Test func sourcesCpRefusesOrFollows() throws {
        let t = TempDir("copy")
        let src = t.sub("src")
        _ = t.sub("src/d")
        try write(src + "/a", "A")
        symlink("a", src + "/link")
        symlink("d", src + "/dirlink")
        let e = #expect(throws: ArchiveError.self) { try tar([src + "/d"], recursive: false) }
        #expect(e?.description.contains("is a folder: copy it with -r") == true)
        #expect(throws: ArchiveError.self) { try tar([src + "/dirlink"], recursive: false) }
        #expect(throws: ArchiveError.self) { try tar([src + "/.."], recursive: true) }
        // Without -r a symlink named on the command line is followed: its file arrives.
        let dst = t.sub("dst")
        try receive(try tar([src + "/link"], recursive: false), at: dst, names: ["link"])
        var st = stat()
        #expect(lstat(dst + "/link", &st) == 0 && st.st_mode & S_IFMT == S_IFREG)
        #expect(read(dst + "/link") == "A")
    }

    /// The other side of a copy may be hostile (a guest answering `uvm cp d:/x .`): it can write
    /// only the names asked for, not beside them, not the destination itself.
    @Test func anArchiveHoldsOnlyTheNamesAskedFor() throws {
        let cases: [[UInt8]] = [
            Forge.file(".bashrc", "pwned"),
            Forge.file("x/../.bashrc", "pwned"),
            Forge.header("./", type: Tar.TypeFlag.directory, mode: 0o777),
            Forge.file("a") + Forge.hardLink("a/h", to: ".bashrc"),
            Forge.file("ab", "pwned"),
        ]
        for bytes in cases {
            let t = TempDir("copy")
            let dst = t.sub("dst")
            try write(dst + "/.bashrc", "mine")
            chmod(dst, 0o700)
            #expect(throws: ArchiveError.self) { try receive(bytes + Forge.end, at: dst, names: ["a"]) }
            #expect(read(dst + "/.bashrc") == "mine")
            var st = stat()
            #expect(stat(dst, &st) == 0 && st.st_mode & 0o777 == 0o700)
        }
        // Renamed on arrival, hard links included.
        let t = TempDir("copy")
        let dst = t.sub("dst")
        try receive(Forge.header("a/", type: Tar.TypeFlag.directory) + Forge.file("a/f", "F") + Forge.hardLink("a/h", to: "a/f") + Forge.end,
                    at: dst + "/b", names: ["a"])
        #expect(read(dst + "/b/f") == "F" && read(dst + "/b/h") == "F")
    }

    @Test func setuidAndSetgidAreClearedUnlessOwnersAreKept() throws {
        let t = TempDir("copy")
        let dst = t.sub("dst")
        var options = ExtractOptions()
        options.clearedModeBits = UInt32(S_ISUID | S_ISGID)
        try receive(Forge.header("a", mode: 0o6755) + Forge.end, at: dst, names: ["a"], options: options)
        var st = stat()
        #expect(stat(dst + "/a", &st) == 0 && st.st_mode & 0o7777 == 0o755)
    }

    @Test(.enabled(if: isRoot, "giving files to another owner needs root"))
    func newFilesBelongToTheGivenOwner() throws {
        let t = TempDir("copy")
        let src = t.sub("src"), dst = t.sub("dst")
        _ = t.sub("src/d")
        try write(src + "/d/f", "F")
        symlink("f", src + "/d/l")
        var options = ExtractOptions()
        options.owner = .init(uid: 4321, gid: 8765)
        try receive(try tar([src + "/d"], recursive: true), at: dst, names: ["d"], options: options)
        for p in ["/d", "/d/f", "/d/l"] {
            var st = stat()
            #expect(lstat(dst + p, &st) == 0 && st.st_uid == 4321 && st.st_gid == 8765, "\(p)")
        }
    }

    /// In the guest, paths are resolved beneath the distro's root: an absolute symlink or ".."
    /// there cannot reach the agent's own file system.
    @Test func pathsBeneathARootStayThere() throws {
        let t = TempDir("copy")
        let rootPath = t.sub("root"), outside = t.sub("outside")
        _ = t.sub("root/etc")
        try write(rootPath + "/etc/passwd", "inside")
        try write(outside + "/secret", "secret")
        symlink("/", rootPath + "/up")
        symlink(outside, rootPath + "/abs")
        let fd = open(rootPath, O_RDONLY | O_DIRECTORY)
        defer { close(fd) }
        let root = CopyRoot(fd: fd)
        // Out: "/up/etc/passwd" and "../../etc/passwd" are the root's own.
        let dst = t.sub("dst")
        for source in ["/up/etc/passwd", "../../etc/passwd", "/etc/../../../etc/passwd"] {
            try receive(try tar([source], root: root, recursive: false), at: dst + "/got", names: ["passwd"])
            #expect(read(dst + "/got") == "inside", "\(source)")
        }
        // "/abs" names the outside folder's path, which does not exist beneath the root.
        #expect(throws: ArchiveError.self) { try tar(["/abs/secret"], root: root, recursive: false) }
        // In: a destination through the symlink lands inside too.
        try write(t.path + "/new", "N")
        try receive(try tar([t.path + "/new"], recursive: false), at: "/up/../../etc", names: ["new"], root: root)
        #expect(read(rootPath + "/etc/new") == "N")
        #expect(try FileManager.default.contentsOfDirectory(atPath: outside) == ["secret"])
    }
}
