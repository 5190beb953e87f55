import CSyscalls
import Glibc
import Wire

/// A distro running inside the VM: a process that is PID 1 of its own mount, pid and uts
/// namespaces with its root on the distro's disk (WSL2's model). Processes join it by setns.
struct Instance: Sendable {
    var name: String
    var initPID: pid_t
    var rootPath: String { "/proc/\(initPID)/root" }
}

/// An account in a distro's /etc/passwd.
package struct Account: Sendable, Equatable {
    package var name: String
    package var uid: uid_t
    package var gid: gid_t
    package var home: String
    package var shell: String
    package var groups: [gid_t]

    package init(name: String, uid: uid_t, gid: gid_t, home: String, shell: String, groups: [gid_t]) {
        (self.name, self.uid, self.gid, self.home, self.shell, self.groups) = (name, uid, gid, home, shell, groups)
    }
}

actor Instances {
    private var running: [String: Instance] = [:]
    private var starting: [String: Task<(Instance, DistroConfig), Error>] = [:]
    private var stopping: [String: Task<Void, Never>] = [:]
    private var exits: [pid_t: Task<Void, Never>] = [:]

    var names: [String] { running.keys.sorted() }

    /// The instance of `distro` if it runs.
    func running(_ distro: String) -> Instance? { running[distro] }
    var all: [Instance] { Array(running.values) }

    /// The running instance of `distro`, started from the disk whose serial is `diskSerial`.
    /// `ignoreConfig`: start it with the defaults, not its /etc/uvm.conf (to repair that file).
    func instance(_ distro: String, diskSerial: String, ignoreConfig: Bool = false) async throws -> Instance {
        // A session that arrives while its instance stops gets a fresh one, not the dying one.
        while let s = stopping[distro] { await s.value }
        if let i = running[distro] { return i }
        if let t = starting[distro] { return try await t.value.0 }
        let task = Task {
            // A disk hot-plugged a moment ago (a distro added or resized while the VM runs) may
            // not have reached the guest's PCIe hot-plug and virtio probe yet.
            let device = try await DistroDisks.device(serial: diskSerial, distro: distro)
            return try Self.start(distro, device: device, ignoreConfig: ignoreConfig)
        }
        starting[distro] = task
        defer { starting[distro] = nil }
        let (instance, config) = try await task.value
        let hostname = config.hostname ?? distro
        GuestNetwork.writeResolvConf(instance, config: config)
        GuestNetwork.writeHosts(instance, hostname: hostname, config: config)
        if let command = config.bootCommand { Self.runBootCommand(command, in: instance) }
        running[distro] = instance
        // The only waiter for this pid (ChildReaper keeps one per pid): stopping awaits this task.
        exits[instance.initPID] = Task { [weak self] in
            _ = await ChildReaper.shared.wait(for: instance.initPID)
            await self?.ended(distro, pid: instance.initPID)
        }
        return instance
    }

    private func ended(_ distro: String, pid: pid_t) {
        exits[pid] = nil
        if running[distro]?.initPID == pid { running[distro] = nil }
    }

    /// Ends one instance (the idle reaper): its init signals everything in it, gives 3 s, syncs;
    /// when the init is gone, so is its mount namespace and with it the distro's file system.
    func stop(_ distro: String) async {
        if let s = stopping[distro] { return await s.value }
        guard let i = running[distro] else { return }
        let exit = exits[i.initPID]
        let task = Task { await Self.terminate(i, exit: exit) }
        stopping[distro] = task
        await task.value
        stopping[distro] = nil
        if running[distro]?.initPID == i.initPID { running[distro] = nil }
    }

    private static func terminate(_ i: Instance, exit: Task<Void, Never>?) async {
        kill(i.initPID, SIGTERM)
        // Backstop: an init that does not end in 5 s takes its namespace down by force.
        let killer = Task {
            try await Task.sleep(for: .seconds(5))
            kill(i.initPID, SIGKILL)
        }
        await exit?.value
        killer.cancel()
    }

    /// Asks every instance to end (its init gives processes 3 s after SIGTERM), waits for them.
    func stopAll() async {
        let all = running.values.map { ($0, exits[$0.initPID]) }
        await withTaskGroup(of: Void.self) { g in
            for (i, exit) in all { g.addTask { await Self.terminate(i, exit: exit) } }
        }
        running.removeAll()
    }

    private static func start(_ distro: String, device: String, ignoreConfig: Bool) throws -> (Instance, DistroConfig) {
        var config = DistroConfig()
        if !ignoreConfig {
            do {
                config = try DistroConfig.validated(peekConfig(device, distro: distro))
            } catch {
                throw WireError(.badRequest, "distro \(distro) does not start: \(error). Repair it with `uvm exec --distro \(distro) --ignore-config --user root -- vi /etc/uvm.conf`")
            }
        }
        var err: Int32 = 0
        var stage: UnsafePointer<CChar>? = nil
        let pid = uvm_start_instance(device, "ext4", "/run/uvm/instances/\(distro)", config.hostname ?? distro, config.sharesRoot, &err, &stage)
        ChildReaper.shared.childStarted()
        guard pid > 0 else {
            throw WireError(.spawnFailed, "distro \(distro): cannot start (\(stage.map { String(cString: $0) } ?? "?"): \(String(cString: strerror(err))))")
        }
        return (Instance(name: distro, initPID: pid), config)
    }

    /// The distro's /etc/uvm.conf, read before its instance starts (its host name and where shares
    /// go are decided then): the disk mounted read-only for a moment. An image without the file,
    /// or with one that is not a regular file, has none.
    private static func peekConfig(_ device: String, distro: String) -> String {
        let dir = "/run/uvm/peek-\(distro)"
        mkdir(dir, 0o700)
        defer { rmdir(dir) }
        guard uvm_mount(device, dir, "ext4", UInt(MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC), nil) == 0 else { return "" }
        defer { _ = umount2(dir, 0) }
        // Not through links: a symlink would resolve against our root, not the distro's.
        let etc = open("\(dir)/etc", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        guard etc >= 0 else { return "" }
        defer { close(etc) }
        let fd = openat(etc, "uvm.conf", O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { return "" }
        close(fd)
        return readSmallFile("\(dir)/etc/uvm.conf", limit: 64 << 10) ?? ""
    }

    /// `[boot] command`: run as root in the instance when it starts, in the background (WSL's).
    private static func runBootCommand(_ command: String, in instance: Instance) {
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { close(null) }
        let root = Account(name: "root", uid: 0, gid: 0, home: "/root", shell: "/bin/sh", groups: [0])
        do {
            let pid = try spawnProcess(argv: ["/bin/sh", "-c", command], env: ["PATH": ProcessSession.defaultPath, "HOME": "/root"],
                                       cwd: "/", fallbackCwd: "/", account: root, stdio: (null, null, null), tty: false,
                                       instancePID: instance.initPID)
            Task { _ = await ChildReaper.shared.wait(for: pid) }
            log("instance \(instance.name): boot command started")
        } catch {
            log("instance \(instance.name): boot command failed to start: \(error)")
        }
    }

    /// /dev/vdX whose virtio-blk serial is `serial`.
    static func findDisk(serial: String) -> String? {
        guard let dir = opendir("/sys/block") else { return nil }
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            guard name.hasPrefix("vd") else { continue }
            if readSmallFile("/sys/block/\(name)/serial")?.trimmed == serial { return "/dev/\(name)" }
        }
        return nil
    }
}

extension Instance {
    /// Looks `user` (a name or a numeric uid; nil: the distro's default user, `[user] default`
    /// in its /etc/uvm.conf as in WSL's wsl.conf, else root) up in the instance's /etc/passwd.
    func account(_ user: String?) throws -> Account {
        let passwd = readSmallFile("\(rootPath)/etc/passwd") ?? ""
        let groupFile = readSmallFile("\(rootPath)/etc/group") ?? ""
        let configured = user == nil ? DistroConfig.parse(readSmallFile("\(rootPath)/etc/uvm.conf") ?? "").values["user.default"] : nil
        let wanted = user ?? configured ?? "root"
        for line in passwd.split(separator: "\n") {
            let f = line.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
            guard f.count >= 7, let uid = uid_t(f[2]), let gid = gid_t(f[3]) else { continue }
            guard f[0] == wanted || f[2] == wanted else { continue }
            var groups: [gid_t] = [gid]
            for g in groupFile.split(separator: "\n") {
                let gf = g.split(separator: ":", omittingEmptySubsequences: false)
                guard gf.count >= 4, let id = gid_t(gf[2]) else { continue }
                if gf[3].split(separator: ",").contains(where: { $0 == f[0] }) && !groups.contains(id) { groups.append(id) }
            }
            return Account(name: f[0], uid: uid, gid: gid, home: f[5].isEmpty ? "/" : f[5], shell: f[6].isEmpty ? "/bin/sh" : f[6], groups: groups)
        }
        if user == nil && configured == nil { return Account(name: "root", uid: 0, gid: 0, home: "/root", shell: "/bin/sh", groups: [0]) }
        if let configured { throw WireError(.notFound, "the default user '\(configured)' of distro \(name) (its /etc/uvm.conf, [user] default) is not in its /etc/passwd") }
        if let uid = uid_t(wanted) { return Account(name: wanted, uid: uid, gid: gid_t(uid), home: "/", shell: "/bin/sh", groups: [gid_t(uid)]) }
        throw WireError(.notFound, "no user '\(wanted)' in distro \(name) (see its /etc/passwd)")
    }
}

func readSmallFile(_ path: String, limit: Int = 1 << 20) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var out = [UInt8]()
    var buf = [UInt8](repeating: 0, count: 16384)
    while out.count < limit {
        let n = read(fd, &buf, buf.count)
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
        out.append(contentsOf: buf[0..<n])
    }
    return String(decoding: out, as: UTF8.self)
}

extension String {
    var trimmed: String {
        var s = Substring(self)
        while let c = s.first, c.isWhitespace { s.removeFirst() }
        while let c = s.last, c.isWhitespace { s.removeLast() }
        return String(s)
    }
}
