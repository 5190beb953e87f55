import Foundation
import Testing

extension EndToEnd {
    /// `uvm mount DISTRO DIR`: the distro's files on the host through FUSE, served by the guest
    /// agent over 9P, on the real VM; as the test account, without root.
    @Suite struct MountTests {
        static let distro = "busybox"

        /// What FUSE needs from the host for an ordinary account (scripts/setup.sh arranges it):
        /// a missing piece fails the test saying so, rather than skipping it.
        static func requireFuse() throws {
            try #require(access("/dev/fuse", R_OK | W_OK) == 0, "/dev/fuse is not read-write for uid \(getuid()): `make setup` (as root) makes it 0666")
            try #require(access("/usr/bin/fusermount3", X_OK) == 0, "no /usr/bin/fusermount3: `make setup` installs fuse3")
        }

        /// A fresh empty folder, and on the way out nothing mounted on it.
        static func withMount(_ tag: String, args: [String] = [], in parent: String = "/tmp", _ body: (String) throws -> Void) throws {
            try requireFuse()
            let dir = "\(parent)/uvm-e2e-mount-\(getpid())-\(tag)"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            defer {
                if isMounted(dir) {
                    _ = try? Harness.run(["unmount", dir], timeout: 60)
                    if isMounted(dir) { _ = try? Harness.runProcess("/usr/bin/fusermount3", ["-u", "-z", dir], stdin: nil, env: [:]) }
                }
                rmdir(dir)
            }
            let r = try Harness.run(["mount"] + args + [distro, dir], timeout: 240)
            try #require(r.status == 0, "uvm mount: \(r.err)")
            #expect(r.out.isEmpty && r.err.isEmpty, "uvm mount printed: \(r.out) \(r.err)")
            try body(dir)
        }

        /// Whether /proc/self/mountinfo has a mount at `dir`.
        static func isMounted(_ dir: String) -> Bool {
            mountType(dir) != nil
        }

        static func mountType(_ dir: String) -> String? {
            guard let text = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return nil }
            var type: String? = nil
            for line in text.split(separator: "\n") {
                let f = line.split(separator: " ")
                if f.count > 6, f[4] == dir, let dash = f.firstIndex(of: "-"), dash + 1 < f.count { type = String(f[dash + 1]) }
            }
            return type
        }

        /// The pids of processes whose command line names `dir` (the mount's background process).
        static func processes(naming dir: String) -> [Int32] {
            guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc") else { return [] }
            return entries.compactMap { Int32($0) }.filter { pid in
                guard pid != getpid(), let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
                let args = data.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
                return args.contains(dir) && args.contains("mount")
            }
        }

        static func guest(_ script: String, user: String? = nil) throws -> Harness.Result {
            try Harness.run(["exec"] + (user.map { ["--user", $0] } ?? []) + ["--", "sh", "-c", script])
        }

        static func status() throws -> [String: Any] {
            let r = try Harness.run(["status", "--format", "json"])
            return (try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any]) ?? [:]
        }

        @Test func theDistroShowsOnTheHostAndFilesCrossBothWays() throws {
            try Self.withMount("files") { (dir: String) throws in
                #expect(Self.mountType(dir) == "fuse.uvm")
                let osRelease = try String(contentsOfFile: dir + "/etc/os-release", encoding: .utf8)
                #expect(osRelease.contains("ID="), "\(osRelease)")
                let ls = try Harness.runProcess("/bin/ls", [dir + "/etc/os-release"], stdin: nil, env: [:])
                #expect(ls.status == 0 && ls.out == dir + "/etc/os-release\n", "ls: \(ls.out) \(ls.err)")

                // Host -> guest, a small file and one of several 9P messages.
                let tag = "\(getpid())"
                try "from the host \(tag)\n".write(toFile: "\(dir)/tmp/host-\(tag)", atomically: false, encoding: .utf8)
                #expect(try Self.guest("cat /tmp/host-\(tag)").out == "from the host \(tag)\n")
                var big = Data(count: 3 << 20)
                big.withUnsafeMutableBytes { raw in for i in 0..<raw.count { raw[i] = UInt8(truncatingIfNeeded: i &* 2654435761 >> 13) } }
                try big.write(to: URL(fileURLWithPath: "\(dir)/tmp/big-\(tag)"))
                let hostSum = try Harness.runProcess("/usr/bin/sha256sum", ["\(dir)/tmp/big-\(tag)"], stdin: nil, env: [:]).out.prefix(64)
                let guestSum = try Self.guest("sha256sum /tmp/big-\(tag)").out.prefix(64)
                #expect(hostSum.count == 64 && hostSum == guestSum, "host \(hostSum) guest \(guestSum)")
                // Reads here and there (the mount reads ahead for sequential readers only).
                let fh = try FileHandle(forReadingFrom: URL(fileURLWithPath: "\(dir)/tmp/big-\(tag)"))
                for (offset, count) in [(1_000_000, 5000), (100, 70_000), (131_072, 131_072), (3_000_000, 200_000), (5, 1)] {
                    try fh.seek(toOffset: UInt64(offset))
                    let got = try fh.read(upToCount: count) ?? Data()
                    #expect(got == big.subdata(in: offset..<min(offset + count, big.count)), "bytes \(offset)+\(count)")
                }
                try fh.close()

                // Guest -> host, and a listing that sees it.
                #expect(try Self.guest("echo from the guest > /tmp/guest-\(tag); mkdir /tmp/dir-\(tag)").status == 0)
                #expect(try String(contentsOfFile: "\(dir)/tmp/guest-\(tag)", encoding: .utf8) == "from the guest\n")
                let names = try FileManager.default.contentsOfDirectory(atPath: "\(dir)/tmp")
                #expect(names.contains("guest-\(tag)") && names.contains("dir-\(tag)"), "\(names)")

                // Rename and remove from the host show in the guest.
                try FileManager.default.moveItem(atPath: "\(dir)/tmp/guest-\(tag)", toPath: "\(dir)/tmp/dir-\(tag)/moved")
                try FileManager.default.removeItem(atPath: "\(dir)/tmp/big-\(tag)")
                #expect(try Self.guest("cat /tmp/dir-\(tag)/moved; test -e /tmp/big-\(tag) || echo gone").out == "from the guest\ngone\n")
                _ = try Self.guest("rm -rf /tmp/host-\(tag) /tmp/dir-\(tag)")

                // Unmounted: no FUSE mount left, and the background process ends.
                let u = try Harness.run(["unmount", dir])
                #expect(u.status == 0, "unmount: \(u.err)")
                #expect(!Self.isMounted(dir), "still in /proc/self/mountinfo after uvm unmount")
                #expect(Harness.waitUntil(timeout: 10) { Self.processes(naming: dir).isEmpty },
                        "the mount's process is still there: \(Self.processes(naming: dir))")
            }
        }

        @Test func filesMadeFromTheHostBelongToTheDefaultUser() throws {
            // The busybox distro's default user is root; make it `uvm` (uid 1000) for this test.
            // Every guest command here says --user root: the default changes under it.
            let had = try Self.guest("cat /etc/uvm.conf 2>/dev/null", user: "root")
            let original = had.status == 0 ? had.out : nil
            #expect(try Self.guest("printf '[user]\\ndefault = uvm\\n' > /etc/uvm.conf", user: "root").status == 0)
            defer {
                if let original {
                    _ = try? Harness.run(["exec", "--user", "root", "--", "sh", "-c", "cat > /etc/uvm.conf"], stdin: Data(original.utf8))
                } else {
                    _ = try? Self.guest("rm -f /etc/uvm.conf", user: "root")
                }
            }
            try Self.withMount("owner") { (dir: String) throws in
                let name = "owned-\(getpid())"
                #expect(FileManager.default.createFile(atPath: "\(dir)/tmp/\(name)", contents: Data("x\n".utf8)))
                #expect(try Self.guest("stat -c '%u %U' /tmp/\(name)", user: "root").out == "1000 uvm\n")
                // That user's files are yours on the host.
                let attrs = try FileManager.default.attributesOfItem(atPath: "\(dir)/tmp/\(name)")
                #expect((attrs[.ownerAccountID] as? NSNumber)?.uint32Value == getuid(), "\(attrs)")
                // And the host has that user's rights, not root's: /root is root's alone.
                #expect(!FileManager.default.createFile(atPath: "\(dir)/root/\(name)", contents: Data()),
                        "created a file in the guest's /root as the default user")
                #expect(try Self.guest("test -e /root/\(name) && echo there || echo absent", user: "root").out == "absent\n")
                _ = try Self.guest("rm -f /tmp/\(name)", user: "root")
            }
            // --user picks another of the distro's users.
            try Self.withMount("user", args: ["--user", "root"]) { (dir: String) throws in
                let name = "root-\(getpid())"
                #expect(FileManager.default.createFile(atPath: "\(dir)/root/\(name)", contents: Data()))
                #expect(try Self.guest("stat -c '%U' /root/\(name); rm -f /root/\(name)", user: "root").out == "root\n")
            }
        }

        @Test func anIdleMountHoldsNoClientAnOpenFileDoes() throws {
            try Self.withMount("idle") { (dir: String) throws in
                _ = try FileManager.default.contentsOfDirectory(atPath: dir + "/etc")
                // The stream lingers 2 s after the last use, then the reaper counts no client.
                #expect(Harness.waitUntil(timeout: 15) { ((try? Self.status())?["clients"] as? Int) == 0 },
                        "clients: \(String(describing: try? Self.status()["clients"]))")
                let fd = open(dir + "/etc/os-release", O_RDONLY)
                try #require(fd >= 0, "open: \(String(cString: strerror(errno)))")
                defer { close(fd) }
                usleep(3_000_000)
                #expect(((try Self.status())["clients"] as? Int ?? 0) >= 1, "an open file does not count as a client")
            }
        }

        @Test func aVMThatStopsMakesOperationsFailRatherThanHang() throws {
            try Self.withMount("stop") { (dir: String) throws in
                // `uvm stop` while a file is open: its reads fail, within a bound.
                let fd = open(dir + "/etc/os-release", O_RDONLY)
                try #require(fd >= 0, "open: \(String(cString: strerror(errno)))")
                defer { close(fd) }
                #expect(try Harness.run(["stop"]).status == 0)
                var buf = [UInt8](repeating: 0, count: 4096)
                let started = Date()
                let n = read(fd, &buf, buf.count)
                let err = errno
                #expect(n < 0 && err == EIO, "read after uvm stop: \(n), \(String(cString: strerror(err)))")
                #expect(Date().timeIntervalSince(started) < 30)

                // QEMU killed under an open file: the same.
                let fd2 = open(dir + "/etc/os-release", O_RDONLY)
                try #require(fd2 >= 0, "open after the stop (starts the VM again): \(String(cString: strerror(errno)))")
                defer { close(fd2) }
                let qemu = try #require((try Self.status())["qemuPID"] as? Int, "no QEMU pid in uvm status")
                #expect(kill(pid_t(qemu), SIGKILL) == 0)
                let started2 = Date()
                let n2 = read(fd2, &buf, buf.count)
                let err2 = errno
                #expect(n2 < 0 && err2 == EIO, "read after QEMU was killed: \(n2), \(String(cString: strerror(err2)))")
                #expect(Date().timeIntervalSince(started2) < 30)

                // Later operations start the VM again.
                #expect(FileManager.default.fileExists(atPath: dir + "/etc/os-release"))
            }
        }

        @Test func theGuestLookingAtTheMountThroughTheHomeShareIsRefusedNotLooped() throws {
            // Mounted inside the host home, which the guest sees at /mnt/host/home: uvmd serving
            // that share would reach into the mount, and through it the guest again.
            let home = try #require(ProcessInfo.processInfo.environment["HOME"], "no HOME")
            let share = try Harness.run(["share", "list", "--format", "json"])
            try #require(share.out.contains("\"home\""), "the home share is off (UVM_HOME_SHARE): nothing to test: \(share.out)")
            try Self.withMount("loop", in: home) { (dir: String) throws in
                let name = (dir as NSString).lastPathComponent
                let started = Date()
                let r = try Self.guest("ls /mnt/host/home/\(name)/etc 2>&1; stat /mnt/host/home/\(name)/etc/os-release 2>&1")
                #expect(r.out.contains("Too many levels of symbolic links"), "\(r.out)")
                #expect(Date().timeIntervalSince(started) < 30)
                // The host's own view is unaffected.
                #expect(FileManager.default.fileExists(atPath: dir + "/etc/os-release"))
            }
        }

        @Test func badInputGivesAClearErrorAndANonZeroStatus() throws {
            try Self.requireFuse()
            let dir = "/tmp/uvm-e2e-mount-\(getpid())-bad"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: dir) }

            let noDistro = try Harness.run(["mount", "nosuchdistro", dir])
            #expect(noDistro.status != 0 && noDistro.err.contains("there is no distro 'nosuchdistro'"), "\(noDistro.status): \(noDistro.err)")
            #expect(!Self.isMounted(dir))

            let missing = try Harness.run(["mount", Self.distro, dir + "/missing"])
            #expect(missing.status != 0 && missing.err.contains("No such file or directory"), "\(missing.status): \(missing.err)")

            FileManager.default.createFile(atPath: dir + "/file", contents: Data())
            let nonEmpty = try Harness.run(["mount", Self.distro, dir])
            #expect(nonEmpty.status != 0 && nonEmpty.err.contains("is not empty"), "\(nonEmpty.status): \(nonEmpty.err)")
            let notDir = try Harness.run(["mount", Self.distro, dir + "/file"])
            #expect(notDir.status != 0 && notDir.err.contains("is not a folder"), "\(notDir.status): \(notDir.err)")

            let notMounted = try Harness.run(["unmount", dir])
            #expect(notMounted.status != 0 && notMounted.err.contains("is not a mount point"), "\(notMounted.status): \(notMounted.err)")
            let notOurs = try Harness.run(["unmount", "/proc"])
            #expect(notOurs.status != 0 && notOurs.err.contains("not one of `uvm mount`"), "\(notOurs.status): \(notOurs.err)")
        }
    }
}
