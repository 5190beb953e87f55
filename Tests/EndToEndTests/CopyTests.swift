import Foundation
import Testing

extension EndToEnd {
    /// `uvm cp` both ways through the real VM: what a user copies arrives byte for byte, with
    /// cp's rules for names, modes and times, and the distro's user as owner.
    @Suite struct CopyTests {
        static let tag = "uvm-e2e-cp-\(getpid())"

        static func guest(_ script: String, user: String? = nil) throws -> Harness.Result {
            try Harness.run(["exec"] + (user.map { ["--user", $0] } ?? []) + ["--", "sh", "-c", script])
        }

        /// A fresh host folder, removed afterwards by the caller.
        static func hostDir(_ name: String) throws -> String {
            let dir = "/tmp/\(tag)-\(name)"
            try? FileManager.default.removeItem(atPath: dir)
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            return dir
        }

        static func sha256(_ path: String) throws -> String {
            let r = try Harness.runProcess("/usr/bin/sha256sum", [path], stdin: nil, env: ProcessInfo.processInfo.environment)
            return String(r.out.prefix(64))
        }

        @Test func aTreeRoundTripsBothWays() throws {
            // A tree with what cp must get right: a symlink, an empty folder, a mode, a time, 100 MiB.
            let src = try Self.hostDir("src"), out = try Self.hostDir("out")
            defer { try? FileManager.default.removeItem(atPath: src); try? FileManager.default.removeItem(atPath: out) }
            try "hello\n".write(toFile: src + "/a", atomically: false, encoding: .utf8)
            chmod(src + "/a", 0o640)
            var times = [timespec(tv_sec: 1_600_000_000, tv_nsec: 0), timespec(tv_sec: 1_600_000_000, tv_nsec: 0)]
            utimensat(AT_FDCWD, src + "/a", &times, 0)
            try FileManager.default.createSymbolicLink(atPath: src + "/link", withDestinationPath: "a")
            try FileManager.default.createDirectory(atPath: src + "/empty", withIntermediateDirectories: false)
            try FileManager.default.createDirectory(atPath: src + "/sub", withIntermediateDirectories: false)
            let big = try Harness.shell("head -c 104857600 /dev/urandom > '\(src)/sub/big'")
            #expect(big.status == 0, "\(big.err)")
            let bigSum = try Self.sha256(src + "/sub/big")

            // In, under a new name in the user's home (a relative path, as with scp).
            let name = "\(Self.tag)-tree"
            let put = try Harness.run(["cp", "-r", src, ":\(name)"], timeout: 600)
            #expect(put.status == 0, "cp in: \(put.err)")
            defer { _ = try? Self.guest("rm -rf ~/\(name)") }
            let user = try Self.guest("id -un").out.trimmingCharacters(in: .whitespacesAndNewlines)
            let seen = try Self.guest("""
                cd ~/\(name) && find . | sort && readlink link && stat -c '%n %U %a %Y' a sub/big empty \
                && sha256sum sub/big | cut -c1-64
                """)
            #expect(seen.status == 0, "\(seen.err)")
            #expect(seen.out == """
                .
                ./a
                ./empty
                ./link
                ./sub
                ./sub/big
                a
                a \(user) 640 1600000000
                sub/big \(user) 644 \(try mtime(src + "/sub/big"))
                empty \(user) 755 \(try mtime(src + "/empty"))
                \(bigSum)

                """)

            // Out, into an existing folder: it arrives under its own name.
            let get = try Harness.run(["cp", "-r", ":\(name)", out], timeout: 600)
            #expect(get.status == 0, "cp out: \(get.err)")
            let back = out + "/" + name
            #expect(try Self.sha256(back + "/sub/big") == bigSum)
            #expect(try String(contentsOfFile: back + "/a", encoding: .utf8) == "hello\n")
            #expect(try FileManager.default.destinationOfSymbolicLink(atPath: back + "/link") == "a")
            #expect(try FileManager.default.contentsOfDirectory(atPath: back + "/empty").isEmpty)
            var st = stat()
            #expect(stat(back + "/a", &st) == 0 && st.st_mode & 0o7777 == 0o640 && st.st_mtim.tv_sec == 1_600_000_000)
            #expect(st.st_uid == getuid(), "files copied out are the host user's")

            // One file out under a new name; a symlink named without -r is followed.
            #expect(try Harness.run(["cp", ":\(name)/link", out + "/copy"]).status == 0)
            #expect(lstat(out + "/copy", &st) == 0 && st.st_mode & S_IFMT == S_IFREG)
            #expect(try String(contentsOfFile: out + "/copy", encoding: .utf8) == "hello\n")
        }

        func mtime(_ path: String) throws -> Int {
            var st = stat()
            guard stat(path, &st) == 0 else { throw CocoaError(.fileNoSuchFile) }
            return st.st_mtim.tv_sec
        }

        @Test func ownersFollowTheUserOrTheArchive() throws {
            let src = try Self.hostDir("owners")
            defer { try? FileManager.default.removeItem(atPath: src) }
            try "x".write(toFile: src + "/f", atomically: false, encoding: .utf8)
            chmod(src + "/f", 0o4755)
            let dir = "/tmp/\(Self.tag)-owners"
            #expect(try Self.guest("rm -rf \(dir); mkdir -p \(dir); chmod 1777 \(dir)", user: "root").status == 0)
            defer { _ = try? Self.guest("rm -rf \(dir)", user: "root") }
            // Default: the distro's default user, setuid cleared (cp without -p).
            #expect(try Harness.run(["cp", src + "/f", ":\(dir)/mine"]).status == 0)
            // --user root: root's.
            #expect(try Harness.run(["cp", "--user", "root", src + "/f", ":\(dir)/roots"]).status == 0)
            // -a: the host's numeric owner and the setuid bit.
            #expect(try Harness.run(["cp", "-a", src + "/f", ":\(dir)/kept"]).status == 0)
            let r = try Self.guest("id -u; stat -c '%n %u %a' \(dir)/mine \(dir)/roots \(dir)/kept")
            let lines = r.out.split(separator: "\n").map(String.init)
            #expect(lines.count == 4, "\(r.out) \(r.err)")
            guard lines.count == 4 else { return }
            #expect(lines[1] == "\(dir)/mine \(lines[0]) 755")
            #expect(lines[2] == "\(dir)/roots 0 755")
            #expect(lines[3] == "\(dir)/kept \(getuid()) 4755")
        }

        @Test func tarStreamsBothWays() throws {
            let src = try Self.hostDir("stream"), out = try Self.hostDir("stream-out")
            defer { try? FileManager.default.removeItem(atPath: src); try? FileManager.default.removeItem(atPath: out) }
            try FileManager.default.createDirectory(atPath: src + "/d", withIntermediateDirectories: false)
            try "in a tar\n".write(toFile: src + "/d/f", atomically: false, encoding: .utf8)
            let dir = "/tmp/\(Self.tag)-stream"
            #expect(try Self.guest("rm -rf \(dir); mkdir -p \(dir)").status == 0)
            defer { _ = try? Self.guest("rm -rf \(dir)") }
            // `-` as the source: a tar from stdin, unpacked as it is into the folder.
            let put = try Harness.shell("tar -C '\(src)' -c d | '\(Harness.uvm)' cp - ':\(dir)'")
            #expect(put.status == 0, "\(put.err)")
            #expect(try Self.guest("cat \(dir)/d/f").out == "in a tar\n")
            // `-` as DEST: a tar of the sources on stdout, each under its own name.
            let get = try Harness.shell("'\(Harness.uvm)' cp -r ':\(dir)/d' - | tar -C '\(out)' -x")
            #expect(get.status == 0, "\(get.err)")
            #expect(try String(contentsOfFile: out + "/d/f", encoding: .utf8) == "in a tar\n")
            // A corrupt tar: an error saying so, and a non-zero exit.
            let bad = try Harness.run(["cp", "-", ":\(dir)"], stdin: Data(repeating: 0x41, count: 4096))
            #expect(bad.status != 0)
            #expect(bad.err.contains("checksum"), "\(bad.err)")
        }

        @Test func badInputSaysWhatIsWrong() throws {
            let src = try Self.hostDir("bad")
            defer { try? FileManager.default.removeItem(atPath: src) }
            try FileManager.default.createDirectory(atPath: src + "/d", withIntermediateDirectories: false)
            try "f".write(toFile: src + "/f", atomically: false, encoding: .utf8)
            let cases: [([String], String)] = [
                (["cp", src + "/f"], "at least one SOURCE and a DEST"),
                (["cp", src + "/f", src + "/g"], "one side must be a distribution"),
                (["cp", "busybox:/etc/passwd", "other:/tmp/"], "from one distribution to another"),
                (["cp", src + "/f", "nosuch:/tmp/"], "there is no distro 'nosuch'"),
                (["cp", src + "/missing", ":/tmp/"], "No such file"),
                (["cp", src + "/d", ":/tmp/"], "is a folder: copy it with -r"),
                (["cp", ":/etc", src], "is a folder: copy it with -r"),
                (["cp", ":/nonexistent-\(Self.tag)", src], "No such file"),
                (["cp", "-r", src + "/f", src + "/d", ":/nonexistent-\(Self.tag)/"], "no such directory"),
                (["cp", src + "/f", ":/nonexistent-\(Self.tag)/deeper/x"], "No such file"),
                (["cp", ":/etc/passwd", ":/etc/group", src + "/f"], "not a directory"),
            ]
            for (args, message) in cases {
                let r = try Harness.run(args)
                #expect(r.status != 0, "\(args) exited 0")
                #expect(r.err.contains(message), "\(args): \(r.err)")
            }
            #expect(try FileManager.default.contentsOfDirectory(atPath: src).sorted() == ["d", "f"], "a failed copy leaves nothing")
        }
    }
}
