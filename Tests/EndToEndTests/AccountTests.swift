import Foundation
import Testing

/// The accounts and staging folder `make test` prepared as root (scripts/test.sh).
struct TestAccounts {
    var user: String
    var other: String
    var stage: String
    static let current: TestAccounts? = {
        let env = ProcessInfo.processInfo.environment
        guard getuid() == 0, let u = env["UVM_TEST_USER"], let o = env["UVM_TEST_OTHER_USER"], let s = env["UVM_TEST_STAGE"] else { return nil }
        return TestAccounts(user: u, other: o, stage: s)
    }()
}

/// uvm from ordinary accounts, as root arranges them: each user gets their own uvmd, VM and
/// socket (qemu:///session), and neither reaches the other's. Needs root to act as two users;
/// `make test` as root creates the accounts (scripts/test-accounts.sh) and a staging folder with
/// the binaries and images they can read, and runs the rest of the end-to-end suite as `uvmtest`.
@Suite(.serialized, .enabled(if: TestAccounts.current != nil,
                             "needs root and the test accounts: `make test` as root creates them (UVM_TEST_USER, UVM_TEST_OTHER_USER, UVM_TEST_STAGE)"))
struct AccountTests {
    static var setup: TestAccounts? { TestAccounts.current }

    struct Account {
        var name: String
        var uid: uid_t
        var gid: gid_t
        var dir: String

        init(_ name: String) throws {
            let pw = try #require(getpwnam(name), "no account \(name)")
            self.name = name
            uid = pw.pointee.pw_uid
            gid = pw.pointee.pw_gid
            dir = String(cString: pw.pointee.pw_dir)
        }
    }

    /// A private UVM_HOME owned by `account`, removed (with its uvmd and VM) afterwards.
    func withHome(_ account: Account, _ tag: String, _ body: (String) throws -> Void) throws {
        let home = "/tmp/uvm-acct-\(getpid())-\(tag)"
        try? FileManager.default.removeItem(atPath: home)
        try FileManager.default.createDirectory(atPath: home, withIntermediateDirectories: true)
        chown(home, account.uid, account.gid)
        chmod(home, 0o700)
        defer {
            _ = try? run(account, home: home, ["stop"], timeout: 60)
            if let pid = try? String(contentsOfFile: "\(home)/state/uvmd.lock", encoding: .utf8), let p = pid_t(pid.trimmingCharacters(in: .whitespacesAndNewlines)) {
                kill(p, SIGTERM)
            }
            try? FileManager.default.removeItem(atPath: home)
        }
        try body(home)
    }

    /// `uvm ARGS` as `account`, with only what a login would give it plus the uvm settings.
    func run(_ account: Account, home: String, _ args: [String], env extra: [String: String] = [:], timeout: Double = 300) throws -> Harness.Result {
        let stage = AccountTests.setup!.stage
        var env = ["HOME": account.dir, "USER": account.name, "LOGNAME": account.name, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
                   "UVM_HOME": home, "UVMD_PATH": "\(stage)/bin/uvmd", "XDG_CONFIG_HOME": "\(home)/config",
                   "UVM_KERNEL": "\(stage)/kernel/bzImage", "UVM_IMAGES": "\(stage)/images"]
        for (k, v) in extra { env[k] = v }
        let envArgs = env.map { "\($0.key)=\($0.value)" }.sorted()
        return try Harness.runProcess("/usr/bin/setpriv", ["--reuid=\(account.uid)", "--regid=\(account.gid)", "--init-groups", "env", "-i"]
                                      + envArgs + ["\(stage)/bin/uvm"] + args, stdin: nil, env: [:], timeout: timeout, cwd: "/")
    }

    static func ownerOf(pid: Int) -> uid_t? {
        var st = stat()
        return stat("/proc/\(pid)", &st) == 0 ? st.st_uid : nil
    }

    static func json(_ r: Harness.Result) -> [String: Any] {
        (try? JSONSerialization.jsonObject(with: r.stdout) as? [String: Any]) ?? [:]
    }

    @Test func eachUserHasTheirOwnVMAndNeitherReachesTheOther() throws {
        let setup = try #require(Self.setup)
        let a = try Account(setup.user), b = try Account(setup.other)
        let release = (try? String(contentsOfFile: "\(setup.stage)/kernel/release", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
        try withHome(a, "a") { homeA in
            try withHome(b, "b") { homeB in
                let first = try run(a, home: homeA, ["exec", "--", "uname", "-r"])
                try #require(first.status == 0, "\(a.name): \(first.err)\n\(Harness.daemonLog(homeA))")
                if let release { #expect(first.out == release + "\n") }
                let statusA = Self.json(try run(a, home: homeA, ["status", "--format", "json"]))
                #expect(statusA["libvirtURI"] as? String == "qemu:///session")
                #expect(statusA["state"] as? String == "Running")
                let qemuA = try #require(statusA["qemuPID"] as? Int)
                #expect(Self.ownerOf(pid: qemuA) == a.uid, "QEMU of \(a.name) runs as uid \(Self.ownerOf(pid: qemuA).map { "\($0)" } ?? "?")")
                let uvmdA = try #require(statusA["daemonPID"] as? Int)
                #expect(Self.ownerOf(pid: uvmdA) == a.uid)

                // The second user gets a VM of their own, beside the first.
                let second = try run(b, home: homeB, ["exec", "--", "echo", "mine"])
                try #require(second.status == 0, "\(b.name): \(second.err)\n\(Harness.daemonLog(homeB))")
                #expect(second.out == "mine\n")
                let statusB = Self.json(try run(b, home: homeB, ["status", "--format", "json"]))
                let qemuB = try #require(statusB["qemuPID"] as? Int)
                #expect(qemuB != qemuA)
                #expect(Self.ownerOf(pid: qemuB) == b.uid)
                #expect(statusB["domain"] as? String != statusA["domain"] as? String)

                // The socket's own mode keeps the second user out...
                let socketA = "\(homeA)/state/uvmd.sock"
                let blocked = try run(b, home: homeB, ["exec", "--", "echo", "intruder"], env: ["UVM_SOCKET": socketA])
                #expect(blocked.status == 125)
                #expect(blocked.err.contains("Permission denied") && blocked.err.contains("another user"), "\(blocked.err)")
                #expect(!blocked.out.contains("intruder"))

                // ...and where it does not (a socket opened up by mistake, or an activated one), uvmd's
                // SO_PEERCRED check does.
                var modes: [(String, mode_t)] = []
                for path in [homeA, "\(homeA)/state", socketA] {
                    var st = stat()
                    try #require(stat(path, &st) == 0)
                    modes.append((path, st.st_mode & 0o7777))
                    chmod(path, path == socketA ? 0o666 : 0o711)
                }
                defer { for (path, mode) in modes { chmod(path, mode) } }
                let refused = try run(b, home: homeB, ["exec", "--", "echo", "intruder"], env: ["UVM_SOCKET": socketA])
                #expect(refused.status == 125)
                #expect(refused.err.contains("serves uid \(a.uid) only"), "\(refused.err)")
                #expect(!refused.out.contains("intruder"))
                let log = (try? String(contentsOfFile: "\(homeA)/state/uvmd.log", encoding: .utf8)) ?? ""
                #expect(log.contains("refused a connection from another user"))
                #expect(log.contains("uid=\(b.uid)"), "uvmd log names the refused uid")

                // The first user's uvmd goes on serving its own user.
                let again = try run(a, home: homeA, ["exec", "--", "echo", "still mine"])
                #expect(again.status == 0 && again.out == "still mine\n", "\(again.err)")
            }
        }
    }

    @Test(.enabled(if: FileManager.default.fileExists(atPath: "/dev/kvm"), "no /dev/kvm on this host: nothing for group kvm to grant"))
    func doctorTellsAUserOutsideGroupKVMHowToJoinIt() throws {
        let setup = try #require(Self.setup)
        let b = try Account(setup.other)
        try withHome(b, "doctor") { home in
            let r = try run(b, home: home, ["doctor"])
            #expect(r.status != 0)
            #expect(r.out.contains("\(b.name) is not in group kvm"), "\(r.out)")
            #expect(r.out.contains("sudo usermod -aG kvm,libvirt \(b.name)"), "\(r.out)")
            #expect(r.out.contains("log in again"))
            // Everything else it needs is there: only /dev/kvm fails.
            #expect(r.out.split(separator: "\n").filter { $0.hasPrefix("FAIL") }.count == 1, "\(r.out)")
        }
    }

    /// `make run`/`make test` as an ordinary user: set-up does what needs no root and, for what
    /// does, prints the command and stops.
    @Test(.enabled(if: FileManager.default.fileExists(atPath: "/dev/kvm"), "no /dev/kvm on this host: nothing for group kvm to grant"))
    func setupTellsAnOrdinaryUserWhatToRunAsRoot() throws {
        let setup = try #require(Self.setup)
        for (name, ready) in [(setup.user, true), (setup.other, false)] {
            let account = try Account(name)
            let r = try Harness.runProcess("/usr/bin/setpriv", ["--reuid=\(account.uid)", "--regid=\(account.gid)", "--init-groups", "env", "-i",
                                                                "HOME=\(account.dir)", "USER=\(name)", "PATH=/usr/bin:/bin:/usr/sbin:/sbin",
                                                                "bash", "\(setup.stage)/setup.sh"], stdin: nil, env: [:], timeout: 180)
            if ready {
                #expect(r.status == 0 && r.err.contains("setup: ok"), "\(name): \(r.err)")
            } else {
                #expect(r.status == 1, "\(name): \(r.err)")
                #expect(r.out == "sudo usermod -aG kvm,libvirt \(name)\n", "\(name): \(r.out)")
                #expect(r.err.contains("not in group kvm") && r.err.contains("log in again"), "\(r.err)")
            }
        }
    }

    /// Root is the exception: the system daemon, with QEMU run as root by a static DAC label.
    @Test func rootUsesTheSystemDaemon() throws {
        let home = "/tmp/uvm-acct-\(getpid())-root"
        try? FileManager.default.removeItem(atPath: home)
        defer {
            Harness.stopDaemon(home: home)
            try? FileManager.default.removeItem(atPath: home)
        }
        let r = try Harness.run(["exec", "--", "id", "-u"], home: home)
        try #require(r.status == 0, "\(r.err)\n\(Harness.daemonLog(home))")
        let status = try Harness.status(home: home)
        #expect(status["libvirtURI"] as? String == "qemu:///system")
        let qemu = try #require(status["qemuPID"] as? Int)
        #expect(Self.ownerOf(pid: qemu) == 0)
    }
}
