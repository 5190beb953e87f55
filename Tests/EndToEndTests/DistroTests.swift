import Foundation
import Testing

extension EndToEnd {
    /// `uvm import`, `export`, `unregister`, `default` and `terminate` on the real VM, with
    /// tarballs written and read by Python's tarfile (Fixtures/tartool.py), not by uvm's own code.
    @Suite struct DistroTests {
        static let work = "/tmp/uvm-e2e-distros-\(getuid())"

        static func prepare() throws -> String {
            try? FileManager.default.removeItem(atPath: work)
            try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
            return work
        }

        static func tool(_ args: [String]) throws -> Harness.Result {
            try Harness.runProcess("/usr/bin/python3", [Harness.fixture("tartool.py")] + args, stdin: nil,
                                   env: ProcessInfo.processInfo.environment, timeout: 600)
        }

        static func listing(_ tar: String) throws -> [String: [String: Any]] {
            let r = try tool(["listing", tar])
            try #require(r.status == 0, "listing \(tar): \(r.err)")
            var out: [String: [String: Any]] = [:]
            for line in r.out.split(separator: "\n") {
                let e = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
                out[e["path"] as! String] = e
            }
            return out
        }

        static func distros() throws -> [String] {
            let r = try Harness.run(["list", "--format", "json"])
            let json = try #require(try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any])
            return (json["instances"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
        }

        static var hostUser: String { String(cString: getpwuid(getuid())!.pointee.pw_name) }

        /// What uvm itself changes in an imported distro: the default user it adds, the resolver
        /// configuration an instance writes at start, and mkfs's lost+found.
        static func changedByUVM(_ path: String) -> Bool {
            let user = hostUser
            return ["etc/passwd", "etc/group", "etc/shadow", "etc/gshadow", "etc/uvm.conf", "etc/resolv.conf", "etc/hosts",
                    "etc/hostname", "lost+found", "home"].contains(path)
                || path.hasPrefix("home/\(user)") || path.hasPrefix("etc/sudoers.d/")
        }

        @Test func exportImportRoundTripKeepsEveryKindOfFileExactly() throws {
            let dir = try Self.prepare()
            defer { try? FileManager.default.removeItem(atPath: dir) }
            _ = try? Harness.run(["unregister", "rt"])
            // A real root file system (busybox's), plus every kind of entry.
            let base = try Harness.run(["export", "busybox", "\(dir)/base.tar"], timeout: 600)
            try #require(base.status == 0, "export busybox: \(base.err)")
            let augmented = try Self.tool(["augment", "\(dir)/base.tar", "\(dir)/rt.tar"])
            try #require(augmented.status == 0, "\(augmented.err)")
            let zst = try Harness.runProcess("/usr/bin/zstd", ["-q", "-f", "\(dir)/rt.tar", "-o", "\(dir)/rt.tar.zst"], stdin: nil,
                                             env: ProcessInfo.processInfo.environment)
            try #require(zst.status == 0, "\(zst.err)")

            let imported = try Harness.run(["import", "rt", "\(dir)/rt.tar.zst", "--size", "4G"], timeout: 900)
            #expect(imported.status == 0, "import: \(imported.err)")
            #expect(imported.out.contains("imported rt"), "\(imported.out)")
            defer { _ = try? Harness.run(["unregister", "rt"]) }
            #expect(try Self.distros().contains("rt"))

            // Inside: the default user is the host user; the special files are what the tar says.
            let who = try Harness.run(["exec", "--distro", "rt", "--", "id", "-un"])
            #expect(who.status == 0 && who.out == "\(Self.hostUser)\n", "\(who.out) \(who.err)")
            let look = try Harness.run(["exec", "--distro", "rt", "--user", "root", "--", "sh", "-c",
                                        "cd /rt && stat -c '%n %A %u %g %t:%T %h' setuid null loop9 fifo linked-a && stat -c '%s %b' sparse"])
            #expect(look.status == 0, "\(look.err)")
            let lines = look.out.split(separator: "\n").map(String.init)
            #expect(lines.contains("setuid -rwsr-xr-x 1234 1234 0:0 1"), "\(look.out)")
            #expect(lines.contains("null crw-rw-rw- 0 0 1:3 1"), "\(look.out)")
            #expect(lines.contains("loop9 brw-rw---- 0 6 7:9 1"), "\(look.out)")
            #expect(lines.contains("fifo prw------- 4321 0 0:0 1"), "\(look.out)")
            #expect(lines.contains("linked-a -rw-r--r-- 0 0 0:0 2"), "\(look.out)")
            // 1 GiB apparent, a few hundred KiB allocated: the holes stayed holes.
            let sparse = lines.last?.split(separator: " ").compactMap { Int($0) } ?? []
            #expect(sparse.count == 2 && sparse[0] == 1 << 30 && sparse[1] < 4096, "\(look.out)")

            // Out again: the same entries, owners, modes, links, devices, xattrs and bytes.
            let exported = try Harness.run(["export", "rt", "\(dir)/back.tar"], timeout: 900)
            #expect(exported.status == 0, "export: \(exported.err)")
            let before = try Self.listing("\(dir)/rt.tar"), after = try Self.listing("\(dir)/back.tar")
            for (path, b) in before where !Self.changedByUVM(path) {
                guard let a = after[path] else { Issue.record("\(path) is missing after the round trip"); continue }
                for key in ["type", "mode", "uid", "gid", "size", "link", "xattrs", "sha256"] {
                    #expect("\(a[key] ?? "nil")" == "\(b[key] ?? "nil")", "\(path): \(key) \(b[key] ?? "nil") became \(a[key] ?? "nil")")
                }
                if b["type"] as? String != "5" {
                    #expect(a["mtime"] as? Int == b["mtime"] as? Int, "\(path): mtime")
                }
            }
            let extra = Set(after.keys).subtracting(before.keys).filter { !Self.changedByUVM($0) }
            #expect(extra.isEmpty, "the export has entries the import did not: \(extra.sorted())")

            // Space freed inside goes back to the host: the disk image is sparse and discards reach it.
            let disk = "\(Harness.home)/data/distros/rt/disk.ext4"
            func allocatedMiB() -> Int {
                var st = stat()
                return stat(disk, &st) == 0 ? Int(st.st_blocks) * 512 / (1 << 20) : -1
            }
            let filled = try Harness.run(["exec", "--distro", "rt", "--user", "root", "--", "sh", "-c",
                                          "dd if=/dev/zero of=/big bs=1M count=1024 2>/dev/null && sync"], timeout: 600)
            #expect(filled.status == 0, "\(filled.err)")
            let full = allocatedMiB()
            let freed = try Harness.run(["exec", "--distro", "rt", "--user", "root", "--", "sh", "-c", "rm /big && sync"], timeout: 600)
            #expect(freed.status == 0, "\(freed.err)")
            // The journal commits (and discards) within a few seconds of the sync.
            #expect(Harness.waitUntil(timeout: 30) { full - allocatedMiB() >= 900 }, "allocated \(full) MiB with the file, \(allocatedMiB()) MiB after deleting it")
        }

        @Test func badImportsSayWhyAndLeaveNothing() throws {
            let dir = try Self.prepare()
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let before = try Self.distros()
            // Not a tarball at all.
            try "just text\n".write(toFile: "\(dir)/notes.txt", atomically: true, encoding: .utf8)
            let text = try Harness.run(["import", "bad1", "\(dir)/notes.txt"])
            #expect(text.status != 0 && text.err.contains("not a tarball"), "\(text.err)")
            // A tarball, but not of a root file system.
            #expect(try Self.tool(["rootless", "\(dir)/rootless.tar"]).status == 0)
            let rootless = try Harness.run(["import", "bad2", "\(dir)/rootless.tar"])
            #expect(rootless.status != 0 && rootless.err.contains("not a root file system"), "\(rootless.err)")
            // Truncated compressed data.
            let full = try Harness.run(["export", "busybox", "\(dir)/bb.tar.gz"], timeout: 600)
            try #require(full.status == 0, "\(full.err)")
            let data = try Data(contentsOf: URL(fileURLWithPath: "\(dir)/bb.tar.gz"))
            try data.prefix(data.count / 2).write(to: URL(fileURLWithPath: "\(dir)/cut.tar.gz"))
            let cut = try Harness.run(["import", "bad3", "\(dir)/cut.tar.gz"])
            #expect(cut.status != 0 && cut.err.contains("corrupt or truncated"), "\(cut.err)")
            // Truncated plain tar: no decompressor to notice; the VM's extractor does. Exported
            // with the VM stopped: the boot starts busybox's instance while the export runs, and
            // the export used to find the disk busy and pack an empty folder, saying it succeeded.
            #expect(try Harness.run(["stop"]).status == 0)
            let plain = try Harness.run(["export", "busybox", "\(dir)/bb.tar"], timeout: 600)
            try #require(plain.status == 0, "\(plain.err)")
            let listed = try Harness.runProcess("/usr/bin/tar", ["-tf", "\(dir)/bb.tar"], stdin: nil, env: [:])
            #expect(listed.out.split(separator: "\n").contains("bin/busybox") && listed.out.split(separator: "\n").count > 100,
                    "exported: \(listed.out.prefix(300))")
            let tar = try Data(contentsOf: URL(fileURLWithPath: "\(dir)/bb.tar"))
            try tar.prefix(tar.count / 2 / 512 * 512).write(to: URL(fileURLWithPath: "\(dir)/cut.tar"))
            let cutPlain = try Harness.run(["import", "bad5", "\(dir)/cut.tar"])
            #expect(cutPlain.status != 0 && cutPlain.err.contains("truncated archive"), "\(cutPlain.err)")
            // A name that is taken, a bad name, a missing file, an unknown distro.
            let taken = try Harness.run(["import", "busybox", "\(dir)/bb.tar.gz"])
            #expect(taken.status != 0 && taken.err.contains("already a distro named busybox"), "\(taken.err)")
            let badName = try Harness.run(["import", "../x", "\(dir)/bb.tar.gz"])
            #expect(badName.status != 0 && badName.err.contains("bad distro name"), "\(badName.err)")
            let missing = try Harness.run(["import", "bad4", "\(dir)/nope.tar"])
            #expect(missing.status != 0 && missing.err.contains("No such file"), "\(missing.err)")
            let unknown = try Harness.run(["unregister", "nope"])
            #expect(unknown.status != 0 && unknown.err.contains("no installed distro 'nope'"), "\(unknown.err)")
            // Nothing half-registered.
            #expect(try Self.distros() == before)
            for name in ["bad1", "bad2", "bad3", "bad4", "bad5"] {
                #expect(!FileManager.default.fileExists(atPath: "\(Harness.home)/data/distros/\(name)"), "\(name) left a folder")
            }
            // Nor the plain tars the imports were read from (uvmd deletes each when its import ends).
            let spool = "\(Harness.home)/data/spool"
            let left = (try? FileManager.default.contentsOfDirectory(atPath: spool)) ?? []
            #expect(left.isEmpty, "import tars left in \(spool): \(left)")
        }

        /// A distro's /etc/uvm.conf (WSL's wsl.conf keys) is read when its instance starts; a bad
        /// line stops the start, naming the file and the line, and --ignore-config repairs it.
        @Test func perDistroConfigIsReadAtStartAndABadLineStopsIt() throws {
            _ = try? Harness.run(["unregister", "cfg"])
            let base = try Harness.run(["export", "busybox", "-"], timeout: 600)
            try #require(base.status == 0, "\(base.err)")
            #expect(try Harness.run(["import", "cfg", "-"], stdin: base.stdout, timeout: 600).status == 0)
            defer { _ = try? Harness.run(["unregister", "cfg"]) }
            func root(_ script: String, _ extra: [String] = [], timeout: Double = 300) throws -> Harness.Result {
                try Harness.run(["exec", "--distro", "cfg", "--user", "root"] + extra + ["--", "sh", "-c", script], timeout: timeout)
            }
            let conf = "[network]\nhostname = custom-host\n[boot]\ncommand = echo booted > /boot-ran\n[automount]\nroot = /media/host\n"
            #expect(try root("printf '\(conf)' > /etc/uvm.conf").status == 0)
            #expect(try Harness.run(["terminate", "cfg"]).status == 0)
            let started = try root("hostname; grep custom-host /etc/hosts; ls /media/host; "
                                   + "for i in $(seq 1 20); do test -e /boot-ran && break; sleep 0.5; done; cat /boot-ran")
            #expect(started.status == 0, "\(started.err)")
            #expect(started.out == "custom-host\n127.0.1.1\tcustom-host\nhome\nbooted\n", "\(started.out)")

            // A value of the wrong kind: the instance does not start, and says where.
            #expect(try root("printf '[network]\\nhostname = not valid!\\n' > /etc/uvm.conf").status == 0)
            #expect(try Harness.run(["terminate", "cfg"]).status == 0)
            let refused = try root("true")
            #expect(refused.status == 125 && refused.err.contains("/etc/uvm.conf line 2") && refused.err.contains("does not start"),
                    "\(refused.status) \(refused.err)")
            // Repaired without it; then the defaults (its name as host name) apply.
            #expect(try root("rm /etc/uvm.conf", ["--ignore-config"]).status == 0)
            #expect(try Harness.run(["terminate", "cfg"]).status == 0)
            #expect(try root("hostname").out == "cfg\n")

            // A FIFO in its place (the disk is the guest's: anything may be there) is no config,
            // and the start does not wait for a writer: it used to hang there, and every start
            // of every instance behind it.
            #expect(try root("rm /etc/uvm.conf; mkfifo /etc/uvm.conf").status == 0)
            #expect(try Harness.run(["terminate", "cfg"]).status == 0)
            let fifo = try root("hostname; test -p /etc/uvm.conf && echo fifo", timeout: 120)
            #expect(fifo.status == 0 && fifo.out == "cfg\nfifo\n", "\(fifo.status) \(fifo.out) \(fifo.err)")
            // Nor does a session as the default user, which looks the file up again (it held a
            // thread of the agent for ever; two such stopped the agent).
            let asDefault = try Harness.run(["exec", "--distro", "cfg", "--", "sh", "-c", "id -u"], timeout: 120)
            #expect(asDefault.status == 0 && asDefault.out == "0\n", "\(asDefault.status) \(asDefault.out) \(asDefault.err)")
        }

        /// `uvm manage NAME --resize`: the disk and its file system grow and shrink, the files
        /// stay, and a shrink below what the files need is refused and changes nothing.
        @Test func manageResizeGrowsAndShrinksKeepingFiles() throws {
            _ = try? Harness.run(["unregister", "rs"])
            let base = try Harness.run(["export", "busybox", "-"], timeout: 600)
            try #require(base.status == 0, "\(base.err)")
            #expect(try Harness.run(["import", "rs", "-", "--size", "512M"], stdin: base.stdout, timeout: 600).status == 0)
            defer { _ = try? Harness.run(["unregister", "rs"]) }
            func root(_ script: String) throws -> Harness.Result {
                try Harness.run(["exec", "--distro", "rs", "--user", "root", "--", "sh", "-c", script], timeout: 600)
            }
            /// The root file system's size in KiB, and whether the marker file is intact.
            /// (What the exec said on stderr: the failure message shows why an exec printed nothing.)
            func look() throws -> (kib: Int, intact: Bool, err: String) {
                let r = try root("df -k / | awk 'NR==2 {print $2}'; cat /keep")
                let lines = r.out.split(separator: "\n")
                return (Int(lines.first ?? "") ?? -1, lines.dropFirst().first == "kept", r.err)
            }
            #expect(try root("echo kept > /keep").status == 0)
            let small = try look()
            #expect(small.intact && small.kib > 400_000 && small.kib < 530_000, "\(small)")

            let grown = try Harness.run(["manage", "rs", "--resize", "1G"], timeout: 600)
            #expect(grown.status == 0, "\(grown.err)")
            let big = try look()
            #expect(big.intact && big.kib > 900_000 && big.kib < 1_060_000, "\(big)")

            let shrunk = try Harness.run(["manage", "rs", "--resize", "300M"], timeout: 600)
            #expect(shrunk.status == 0, "\(shrunk.err)")
            let less = try look()
            #expect(less.intact && less.kib > 200_000 && less.kib < 310_000, "\(less)")

            // 100 MiB of files cannot fit in 64M: refused, and nothing changes.
            #expect(try root("dd if=/dev/zero of=/fill bs=1M count=100 2>/dev/null && sync").status == 0)
            let refused = try Harness.run(["manage", "rs", "--resize", "64M"], timeout: 600)
            #expect(refused.status != 0 && refused.err.contains("cannot resize rs"), "\(refused.err)")
            let after = try look()
            #expect(after.intact && after.kib == less.kib, "\(after) vs \(less)")
        }

        @Test func importFromStdinDefaultTerminateAndUnregister() throws {
            let dir = try Self.prepare()
            defer { try? FileManager.default.removeItem(atPath: dir) }
            _ = try? Harness.run(["unregister", "second"])
            let base = try Harness.run(["export", "busybox", "-"], timeout: 600)
            try #require(base.status == 0 && base.stdout.count > 1 << 20, "\(base.err)")
            let imported = try Harness.run(["import", "second", "-"], stdin: base.stdout, timeout: 600)
            #expect(imported.status == 0, "\(imported.err)")
            defer { _ = try? Harness.run(["unregister", "second"]) }

            // Two distros at once, each with its own files.
            #expect(try Harness.run(["exec", "--distro", "second", "--user", "root", "--", "sh", "-c", "echo mine > /second-file"]).status == 0)
            let both = try Harness.run(["exec", "--distro", "busybox", "--", "sh", "-c", "test -e /second-file && echo shared || echo separate"])
            #expect(both.out == "separate\n", "\(both.out) \(both.err)")
            // ... and each its own host name.
            #expect(try Harness.run(["exec", "--distro", "second", "--", "hostname"]).out == "second\n")
            #expect(try Harness.run(["exec", "--distro", "busybox", "--", "hostname"]).out == "busybox\n")

            // The default follows `uvm default`, and back.
            #expect(try Harness.run(["default", "second"]).status == 0)
            #expect(try Harness.run(["default"]).out == "second\n")
            #expect(try Harness.run(["exec", "--", "cat", "/second-file"]).out == "mine\n")
            #expect(try Harness.run(["default", "busybox"]).status == 0)

            // Terminate stops its instance only.
            #expect(try Harness.run(["terminate", "second"]).status == 0)
            let list = try Harness.run(["list", "--format", "json"])
            let json = try #require(try JSONSerialization.jsonObject(with: list.stdout) as? [String: Any])
            let second = (json["instances"] as? [[String: Any]] ?? []).first { $0["name"] as? String == "second" }
            #expect(second?["state"] as? String == "Stopped", "\(list.out)")

            // Unregister: gone, with its disk; its name is free again. A running one is stopped first.
            #expect(try Harness.run(["exec", "--distro", "second", "--", "true"]).status == 0)
            let un = try Harness.run(["unregister", "second"])
            #expect(un.status == 0 && un.err.contains("stopping second's instance"), "\(un.err)")
            #expect(try !Self.distros().contains("second"))
            #expect(!FileManager.default.fileExists(atPath: "\(Harness.home)/data/distros/second"))
            let again = try Harness.run(["exec", "--distro", "second", "--", "true"])
            #expect(again.status != 0 && again.err.contains("no distro 'second'"), "\(again.err)")
        }
    }
}

extension EndToEnd {
    /// `uvm install debian`: Debian 12 built by the recipe in images/debian (mmdebstrap, from the
    /// mirror the host's apt uses; cached after the first build), imported, and usable as a
    /// person expects: bash, the host user as default user with password-less sudo.
    @Suite struct DebianTests {
        /// The host's apt mirror answers (the recipe and apt-get inside need it).
        static let mirrorReachable: Bool = {
            let r = try? Harness.runProcess("/usr/bin/python3", ["-c", """
                import glob, re, socket, sys
                files = glob.glob("/etc/apt/sources.list") + glob.glob("/etc/apt/sources.list.d/*.list") + glob.glob("/etc/apt/sources.list.d/*.sources")
                text = "".join(open(f).read() for f in files)
                m = re.search(r"(?:URIs:|deb)\\s+\\S*?https?://([^/\\s:]+)", text)
                sys.exit(0 if m and socket.create_connection((m.group(1), 80), timeout=5) else 1)
                """], stdin: nil, env: ProcessInfo.processInfo.environment, timeout: 30)
            return r?.status == 0
        }()

        @Test(.enabled(if: mirrorReachable, "the host's Debian mirror is not reachable from here"))
        func installDebianGivesAWorkingDistro() throws {
            _ = try? Harness.run(["unregister", "debian"])
            let installed = try Harness.run(["install", "debian"], timeout: 1800)
            #expect(installed.status == 0, "install: \(installed.err)")
            #expect(installed.out.contains("installed debian (Debian GNU/Linux 12 (bookworm))"), "\(installed.out)")
            defer {
                _ = try? Harness.run(["unregister", "debian"])
                _ = try? Harness.run(["default", "busybox"])
            }
            let release = try Harness.run(["exec", "--distro", "debian", "--", "cat", "/etc/os-release"])
            #expect(release.status == 0 && release.out.contains("VERSION_ID=\"12\""), "\(release.out) \(release.err)")
            let user = try Harness.run(["exec", "--distro", "debian", "--", "id", "-un"])
            #expect(user.out == "\(DistroTests.hostUser)\n", "\(user.out) \(user.err)")
            let sudo = try Harness.run(["exec", "--distro", "debian", "--", "sudo", "-n", "true"])
            #expect(sudo.status == 0, "sudo -n true: \(sudo.err)")
            let bash = try Harness.run(["exec", "--distro", "debian", "--", "bash", "--version"])
            #expect(bash.status == 0 && bash.out.hasPrefix("GNU bash"), "\(bash.out) \(bash.err)")
            let locale = try Harness.run(["exec", "--distro", "debian", "--", "sh", "-c", "cat /etc/default/locale"])
            #expect(locale.out.contains("LANG=C.UTF-8"), "\(locale.out)")
            // Its name is taken now; a second install under another name comes from the cache.
            let again = try Harness.run(["install", "debian"], timeout: 600)
            #expect(again.status != 0 && again.err.contains("already a distro named debian"), "\(again.err)")
            // A disk too small for it: the import fails on the full disk, says so, leaves nothing.
            let recipes = ProcessInfo.processInfo.environment["UVM_RECIPES"] ?? URL(fileURLWithPath: #filePath)
                .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("images").path
            let tarball = try Harness.runProcess("/bin/bash", ["\(recipes)/debian/build.sh"], stdin: nil, env: ProcessInfo.processInfo.environment, timeout: 1800)
            let path = String(tarball.out.split(separator: "\n").last ?? "")
            let tiny = try Harness.run(["import", "tiny", path, "--size", "100M"], timeout: 900)
            #expect(tiny.status != 0 && tiny.err.contains("No space left on device"), "\(tiny.status) \(tiny.err)")
            #expect(!FileManager.default.fileExists(atPath: "\(Harness.home)/data/distros/tiny"))
            // Inside, apt works against the same mirror.
            let apt = try Harness.run(["exec", "--distro", "debian", "--user", "root", "--", "sh", "-c",
                                       "apt-get update -qq && apt-get install -y -qq hello >/dev/null && hello"], timeout: 1200)
            #expect(apt.status == 0 && apt.out.contains("Hello, world!"), "apt: \(apt.out) \(apt.err)")
        }
    }
}
