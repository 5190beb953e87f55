import Foundation
import Testing

extension EndToEnd {
    /// Full Linux inside: `uvm install debian-docker` (Debian with systemd as the instance's init,
    /// Docker and Podman), used as a person would, as the default user (the host account).
    @Suite struct ContainerTests {
        static let name = "debian-docker"

        /// A tiny image made here (no registry is reachable): the host's static busybox.
        static func busyboxTarball() throws -> Data {
            let dir = "/tmp/uvm-bbroot-\(getpid())"
            try? FileManager.default.removeItem(atPath: dir)
            defer { try? FileManager.default.removeItem(atPath: dir) }
            try FileManager.default.createDirectory(atPath: "\(dir)/bin", withIntermediateDirectories: true)
            try FileManager.default.copyItem(atPath: "/bin/busybox", toPath: "\(dir)/bin/busybox")
            for applet in ["sh", "echo", "cat", "ls", "httpd", "true", "sleep", "id", "mkdir"] {
                try FileManager.default.createSymbolicLink(atPath: "\(dir)/bin/\(applet)", withDestinationPath: "busybox")
            }
            let tar = try Harness.runProcess("/bin/tar", ["-C", dir, "-cf", "-", "."], stdin: nil, env: ProcessInfo.processInfo.environment)
            try #require(tar.status == 0, "tar: \(tar.err)")
            return tar.stdout
        }

        func sh(_ script: String, user: String? = nil, stdin: Data? = nil, home: String = Harness.home,
                env: [String: String] = [:], timeout: Double = 600) throws -> Harness.Result {
            var args = ["exec", "--distro", Self.name]
            if let user { args += ["--user", user] }
            return try Harness.run(args + ["--", "bash", "-c", script], stdin: stdin, home: home, env: env, timeout: timeout)
        }

        func install(home: String = Harness.home, env: [String: String] = [:]) throws {
            _ = try? Harness.run(["unregister", Self.name], home: home, env: env)
            let installed = try Harness.run(["install", Self.name], home: home, env: env, timeout: 1800)
            try #require(installed.status == 0, "install: \(installed.err)")
            // systemd brings the instance up; `running` means no unit failed.
            let state = try sh("timeout 300 systemctl is-system-running --wait; systemctl --failed --no-legend --plain", user: "root", home: home, env: env)
            #expect(state.out.hasPrefix("running\n"), "systemctl is-system-running: \(state.out) \(state.err)")
        }

        @Test(.enabled(if: DebianTests.mirrorReachable, "the host's Debian mirror is not reachable from here"))
        func dockerPodmanAndSystemdInDebian() throws {
            try install()
            defer { _ = try? Harness.run(["unregister", Self.name]) }
            let me = DistroTests.hostUser

            // Docker's own check of the running kernel: nothing generally necessary is missing.
            let check = try sh("bash /usr/share/docker.io/contrib/check-config.sh 2>&1 | sed 's/\\x1b\\[[0-9;]*m//g'")
            let necessary = check.out.components(separatedBy: "Optional Features:").first ?? ""
            #expect(check.out.contains("Generally Necessary:") && !necessary.contains("missing"), "\(check.out)")
            for optional in ["CONFIG_CGROUP_PIDS: enabled", "CONFIG_SECCOMP: enabled", "CONFIG_CFS_BANDWIDTH: enabled",
                             "CONFIG_OVERLAY_FS: enabled", "CONFIG_VXLAN: enabled", "CONFIG_IP_VS: enabled"] {
                #expect(check.out.contains(optional), "\(optional) in \(check.out)")
            }

            // The default user's systemd: lingering, with its runtime folder and bus.
            let user = try sh("echo $XDG_RUNTIME_DIR; loginctl show-user \"$USER\" -p Linger; systemctl --user show-environment >/dev/null && echo user-manager")
            #expect(user.out == "/run/user/\(getuid())\nLinger=yes\nuser-manager\n", "\(user.out) \(user.err)")

            // Docker, as the default user (in the docker group): an image made here, run, built from.
            let bb = try Self.busyboxTarball()
            let imported = try sh("docker import - bb:1 >/dev/null && docker run --rm bb:1 echo hi", stdin: bb)
            #expect(imported.status == 0 && imported.out == "hi\n", "\(imported.out) \(imported.err)")
            let built = try sh("""
                d=$(mktemp -d) && printf 'FROM bb:1\\nRUN echo built >/msg\\nCMD ["cat", "/msg"]\\n' >$d/Dockerfile \
                && DOCKER_BUILDKIT=0 docker build -q -t bb:2 $d >/dev/null && docker run --rm bb:2
                """)
            #expect(built.status == 0 && built.out == "built\n", "\(built.out) \(built.err)")

            // A published port reaches the host's localhost through uvm's forwarding.
            let port = 20000 + Int(getpid() % 20000)
            let run = try sh("docker run -d --name web -p \(port):80 bb:1 sh -c 'mkdir -p /www && echo from-container >/www/index.html && httpd -f -p 80 -h /www'")
            #expect(run.status == 0, "\(run.err)")
            var body = ""
            let deadline = Date().addingTimeInterval(60)
            while Date() < deadline {
                let got = try Harness.runProcess("/usr/bin/python3", ["-c", "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:\(port)/', timeout=5).read().decode())"],
                                                 stdin: nil, env: ProcessInfo.processInfo.environment, timeout: 30)
                body = got.out
                if body == "from-container\n" { break }
                Thread.sleep(forTimeInterval: 1)
            }
            #expect(body == "from-container\n", "http://127.0.0.1:\(port)/ gave '\(body)'")
            _ = try sh("docker rm -f web >/dev/null")

            // Rootless Podman, as the default user.
            let podman = try sh("podman import - bb:1 >/dev/null && podman run --rm bb:1 id -u", stdin: bb)
            #expect(podman.status == 0 && podman.out == "0\n", "rootless podman: \(podman.out) \(podman.err)")
            let rootless = try sh("podman info --format '{{.Host.Security.Rootless}}'")
            #expect(rootless.out == "true\n", "\(rootless.out) \(rootless.err)")

            // The kernel features, from user space.
            let ns = try sh("unshare -Urn id -u")
            #expect(ns.out == "0\n", "unshare -Urn: \(ns.out) \(ns.err)")
            let kernel = try sh("""
                set -e
                ip link add v0 type veth peer name v1 && ip -br link show v0 | cut -d@ -f1 && ip link del v0
                nft list ruleset | grep -c 'chain DOCKER' >/dev/null && echo nft
                d=$(mktemp -d) && mkdir $d/lower $d/upper $d/work $d/merged && echo low >$d/lower/f
                fuse-overlayfs -o lowerdir=$d/lower,upperdir=$d/upper,workdir=$d/work $d/merged
                findmnt -n -o FSTYPE $d/merged && cat $d/merged/f && fusermount3 -u $d/merged
                truncate -s 64M $d/img && mkfs.ext4 -q $d/img && dev=$(losetup -f --show $d/img)
                mount $dev $d/merged && echo on-loop >$d/merged/x && cat $d/merged/x && umount $d/merged && losetup -d $dev
                """, user: "root")
            #expect(kernel.out == "v0\nnft\nfuse.fuse-overlayfs\nlow\non-loop\n", "\(kernel.out) \(kernel.err)")
            #expect(!me.isEmpty)

            // uvm terminate stops systemd cleanly (halt, well within its bound), and the file
            // system on the disk is clean afterwards.
            let started = Date()
            let terminated = try Harness.run(["terminate", Self.name], timeout: 120)
            #expect(terminated.status == 0, "\(terminated.err)")
            #expect(Date().timeIntervalSince(started) < 30, "systemd took \(Date().timeIntervalSince(started)) s to stop")
            let fsck = try Harness.runProcess("/sbin/e2fsck", ["-fn", "\(Harness.home)/data/distros/\(Self.name)/disk.ext4"],
                                              stdin: nil, env: ProcessInfo.processInfo.environment, timeout: 300)
            #expect(fsck.status == 0, "e2fsck -fn after terminate: \(fsck.out) \(fsck.err)")
        }

        /// `[boot] keepAlive = services`: an idle instance whose own services run is kept, and
        /// `uvm list` says by what; with them stopped, the reaper stops it.
        @Test(.enabled(if: DebianTests.mirrorReachable, "the host's Debian mirror is not reachable from here"))
        func servicesKeepAnIdleInstanceWhenAsked() throws {
            let home = "/tmp/uvm-keepalive-\(getpid())"
            let env = ["UVM_INSTANCE_IDLE_TIMEOUT": "3s", "UVM_VM_IDLE_TIMEOUT": "never"]
            try? FileManager.default.removeItem(atPath: home)
            defer {
                Harness.stopDaemon(home: home)
                try? FileManager.default.removeItem(atPath: home)
            }
            try install(home: home, env: env)
            let set = try sh("printf '[boot]\\nkeepAlive = services\\n' >>/etc/uvm.conf", user: "root", home: home, env: env)
            #expect(set.status == 0, "\(set.err)")
            _ = try Harness.run(["terminate", Self.name], home: home, env: env, timeout: 120)
            let up = try sh("timeout 300 systemctl is-system-running --wait; systemctl is-active docker", user: "root", home: home, env: env)
            #expect(up.out.hasSuffix("active\n"), "\(up.out) \(up.err)")
            // Idle now: docker.service keeps it.
            var listing = ""
            let deadline = Date().addingTimeInterval(60)
            while Date() < deadline {
                listing = try Harness.run(["list"], home: home, env: env).out
                if listing.contains("kept by") { break }
                Thread.sleep(forTimeInterval: 1)
            }
            #expect(listing.contains("kept by") && listing.contains("docker.service"), "\(listing)")
            #expect(listing.contains("\(Self.name)  Running"), "\(listing)")
            // Without services of its own, the next idle check stops it.
            let stop = try sh("systemctl stop docker.socket docker.service containerd.service", user: "root", home: home, env: env)
            #expect(stop.status == 0, "\(stop.err)")
            let stopDeadline = Date().addingTimeInterval(120)
            while Date() < stopDeadline {
                listing = try Harness.run(["list"], home: home, env: env).out
                if listing.contains("\(Self.name)  Stopped") { break }
                Thread.sleep(forTimeInterval: 1)
            }
            #expect(listing.contains("\(Self.name)  Stopped"), "\(listing)")
        }
    }
}
