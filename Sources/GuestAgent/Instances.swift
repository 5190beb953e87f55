import CSyscalls
import Glibc
import Wire

/// A distro running inside the VM: a process that is PID 1 of its own mount, pid and uts
/// namespaces with its root on the distro's disk (WSL2's model). Processes join it by setns.
struct Instance: Sendable {
    var name: String
    var initPID: pid_t
    /// Its init is the distro's systemd (`[boot] systemd = true`), not uvm's.
    var systemd = false
    /// `[boot] keepAlive = services`.
    var keepAliveServices = false
    /// `[interop] enabled = false` in its /etc/uvm.conf: no `uvm-host` here even where the host
    /// turned interop on. (The distro can only refuse interop, never turn it on: it is the guest.)
    var interopRefused = false
    var rootPath: String { "/proc/\(initPID)/root" }
    /// The root of its cgroup namespace, in the VM's cgroup tree.
    var cgroup: String { InstanceCgroups.dir(name) }
    /// Where `uvm exec` processes go: a leaf below the instance's root (systemd's tree, when
    /// it runs, is beside it).
    var sessionCgroup: String { cgroup + "/uvm-sessions" }
}

/// Each instance has a cgroup of its own, /sys/fs/cgroup/uvm/NAME, with the controllers systemd
/// and container engines use enabled down to it.
enum InstanceCgroups {
    static let base = MemoryReclaimer.cgroupRoot + "/uvm"
    static let controllers = ["cpuset", "cpu", "io", "memory", "pids", "hugetlb", "misc"]

    static func dir(_ name: String) -> String { "\(base)/\(name)" }

    /// Makes the instance's cgroup, its init.scope and the sessions' leaf; nil (the instance
    /// then runs in the VM's root cgroup, as before) when cgroup2 is not there.
    static func prepare(_ name: String) -> String? {
        let root = MemoryReclaimer.cgroupRoot
        guard access("\(root)/cgroup.controllers", R_OK) == 0 else { return nil }
        mkdir(base, 0o755)
        let available = Set((readSmallFile("\(root)/cgroup.controllers") ?? "").split(whereSeparator: { $0 == " " || $0 == "\n" }).map(String.init))
        let enable = controllers.filter(available.contains).map { "+\($0)" }.joined(separator: " ")
        for parent in [root, base] where !enable.isEmpty {
            let err = writeValue("\(parent)/cgroup.subtree_control", enable)
            if err != 0 { log("cgroups: cannot enable \(enable) in \(parent): \(String(cString: strerror(err)))") }
        }
        let d = dir(name)
        remove(d)  // a tree left by an instance that ended without us
        for path in [d, d + "/init.scope", d + "/uvm-sessions"] {
            guard mkdir(path, 0o755) == 0 || errno == EEXIST else {
                log("cgroups: cannot make \(path): \(String(cString: strerror(errno)))")
                return nil
            }
        }
        return d
    }

    /// Units below a systemd slice that have processes, without systemd's own plumbing (journald,
    /// logind, udev, dbus, gettys): "docker.service", "docker-1a2b.scope".
    static func services(_ slice: String) -> [String] {
        guard let d = opendir(slice) else { return [] }
        defer { closedir(d) }
        var found: [String] = []
        while let e = readdir(d) {
            let n = direntName(e)
            guard n.hasSuffix(".service") || n.hasSuffix(".scope") else { continue }
            if n.hasPrefix("systemd-") || n == "dbus.service" || n.hasPrefix("getty@") || n.hasPrefix("serial-getty@")
                || n == "console-getty.service" || n.hasPrefix("user@") { continue }
            if hasProcesses("\(slice)/\(n)") { found.append(n) }
        }
        return found.sorted()
    }

    /// Whether a cgroup or any cgroup below it has a process.
    static func hasProcesses(_ path: String) -> Bool {
        if let procs = readSmallFile("\(path)/cgroup.procs", limit: 4096), procs.contains(where: \.isNumber) { return true }
        guard let d = opendir(path) else { return false }
        defer { closedir(d) }
        while let e = readdir(d) {
            let n = direntName(e)
            if e.pointee.d_type == UInt8(DT_DIR), n != ".", n != "..", hasProcesses("\(path)/\(n)") { return true }
        }
        return false
    }

    /// Removes a cgroup tree whose processes are gone, leaves first.
    static func remove(_ path: String) {
        if let d = opendir(path) {
            var children: [String] = []
            while let e = readdir(d) {
                let n = direntName(e)
                if e.pointee.d_type == UInt8(DT_DIR), n != ".", n != ".." { children.append(n) }
            }
            closedir(d)
            for c in children { remove("\(path)/\(c)") }
        }
        rmdir(path)
    }
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

    /// The instance of `distro` once a start or stop of it under way has ended; nil if it does not
    /// run then. (A boot that a command caused starts that command's distro while the VM is set
    /// up: an export arriving meanwhile must see the instance that is about to mount its disk.)
    func settled(_ distro: String) async -> Instance? {
        while let s = stopping[distro] { await s.value }
        if let t = starting[distro], let (instance, _) = try? await t.value { return instance }
        return running[distro]
    }
    var all: [Instance] { Array(running.values) }

    /// The running instance of `distro`, started from the disk whose serial is `diskSerial`.
    /// `ignoreConfig`: start it with the defaults, not its /etc/uvm.conf (to repair that file).
    func instance(_ distro: String, diskSerial: String, ignoreConfig: Bool = false) async throws -> Instance {
        // A session that arrives while its instance stops gets a fresh one, not the dying one.
        while let s = stopping[distro] { await s.value }
        if let i = running[distro] { return i }
        if let t = starting[distro] { return try await t.value.0 }
        let task = Task {
            // What runs in an instance may use the network from its first instruction.
            await GuestNetwork.ready()
            // A disk hot-plugged a moment ago (a distro added or resized while the VM runs) may
            // not have reached the guest's PCIe hot-plug and virtio probe yet.
            let device = try await DistroDisks.device(serial: diskSerial, distro: distro)
            let (instance, config) = try Self.start(distro, device: device, ignoreConfig: ignoreConfig)
            GuestNetwork.writeResolvConf(instance, config: config)
            GuestNetwork.writeHosts(instance, hostname: config.hostname ?? distro, config: config)
            // Every session waiting for this start waits for the boot too.
            if instance.systemd { await Self.waitForSystemd(instance) }
            return (instance, config)
        }
        starting[distro] = task
        defer { starting[distro] = nil }
        let (instance, config) = try await task.value
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
        if running[distro]?.initPID == pid {
            running[distro] = nil
            InstanceCgroups.remove(InstanceCgroups.dir(distro))
        }
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

    /// How long systemd gets to stop its units (its own default per unit is 90 s, which would
    /// keep a `uvm terminate` waiting; a VM's shutdown should not).
    static let systemdStopLimit: Duration = .seconds(30)

    private static func terminate(_ i: Instance, exit: Task<Void, Never>?) async {
        // systemd: SIGRTMIN+3 is halt, and in a container (we tell it it is in one) halt ends
        // PID 1 after every unit has stopped; SIGTERM would only make it re-execute itself.
        kill(i.initPID, i.systemd ? uvm_sigrtmin() + 3 : SIGTERM)
        // Backstop: an init that does not end in time takes its namespace down by force.
        let limit = i.systemd ? systemdStopLimit : .seconds(5)
        let killer = Task {
            try await Task.sleep(for: limit)
            log("instance \(i.name): its init did not end within \(limit): killed")
            kill(i.initPID, SIGKILL)
        }
        await exit?.value
        killer.cancel()
    }

    /// What keeps `distro` running although idle, under `[boot] keepAlive = services`: services
    /// of its own with processes (systemd's units in its cgroup tree; the distribution's own
    /// plumbing does not count) and ports its processes listen on.
    func activity(_ distro: String) async -> InstanceActivity {
        guard let i = running[distro], i.keepAliveServices else { return InstanceActivity(keptBy: []) }
        var kept = InstanceCgroups.services(i.cgroup + "/system.slice")
        var owners = OwnerCache()
        let ports = await owners.describe(PortTracker.listeningSockets(), instances: self)
        kept += ports.filter { $0.distro == distro }.map { "port \($0.port)" }
        return InstanceActivity(keptBy: kept)
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
        // The disk is mounted once, here, and /etc/uvm.conf read from that mount (it decides the
        // host name, where shares go and the init): the instance's new namespace copies the mount,
        // and ours goes once the instance runs. A read-only mount of its own just to read the
        // file cost a second ext4 mount and unmount per start, ~0.1 s under TCG. Private, so
        // that detaching ours does not reach the copy. Starts run one at a time (this actor), so
        // no other instance's namespace copies this mount meanwhile.
        let root = "/run/uvm/instances/\(distro)"
        mkdir(root, 0o755)
        // discard: blocks freed in the distro are unmapped through virtio-blk, and QEMU
        // (discard=unmap) punches them out of the sparse disk image, so deleted files give their
        // space back to the host.
        guard mount(device, root, "ext4", UInt(MS_NOATIME), "discard") == 0 else {
            throw WireError(.spawnFailed, "distro \(distro): cannot start (mount distro disk: \(String(cString: strerror(errno))))")
        }
        defer { _ = umount2(root, Int32(MNT_DETACH)) }
        _ = mount(nil, root, nil, UInt(MS_PRIVATE), nil)
        var config = DistroConfig()
        if !ignoreConfig {
            do {
                config = try DistroConfig.validated(readConfig(root: root))
            } catch {
                throw WireError(.badRequest, "distro \(distro) does not start: \(error). Repair it with `uvm exec --distro \(distro) --ignore-config --user root -- vi /etc/uvm.conf`")
            }
        }
        var err: Int32 = 0
        var stage: UnsafePointer<CChar>? = nil
        let systemd = config.bool("boot", "systemd") == true
        let cgroup = InstanceCgroups.prepare(distro)
        if systemd && cgroup == nil {
            throw WireError(.spawnFailed, "distro \(distro): [boot] systemd = true needs cgroup v2 in the VM, which is not mounted")
        }
        let pid = cgroup.withOptionalCString { cg in
            (systemd ? Self.systemdPath : nil).withOptionalCString { initPath in
                uvm_start_instance(root, config.hostname ?? distro, config.sharesRoot,
                                   cg, initPath, &err, &stage)
            }
        }
        ChildReaper.shared.childStarted()
        guard pid > 0 else {
            if let cgroup { InstanceCgroups.remove(cgroup) }
            let what = stage.map { String(cString: $0) } ?? "?"
            let hint = systemd && err == ENOENT ? " (is systemd installed in it? `[boot] systemd = false` in its /etc/uvm.conf turns it off)" : ""
            throw WireError(.spawnFailed, "distro \(distro): cannot start (\(what): \(String(cString: strerror(err))))\(hint)")
        }
        if systemd { log("instance \(distro): systemd is its init (pid \(pid))") }
        return (Instance(name: distro, initPID: pid, systemd: systemd, keepAliveServices: config.keepAliveServices,
                         interopRefused: config.bool("interop", "enabled") == false), config)
    }

    /// Inside the instance (Debian and most distributions since the /usr merge).
    static let systemdPath = "/lib/systemd/systemd"

    /// The distro's /etc/uvm.conf from its file system mounted at `root`, before its instance
    /// starts. An image without the file, or with one that is not a regular file, has none.
    private static func readConfig(root: String) -> String {
        // Not through links: a symlink would resolve against our root, not the distro's.
        let etc = open("\(root)/etc", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        guard etc >= 0 else { return "" }
        defer { close(etc) }
        // Non-blocking: a FIFO there must not hold the start.
        let fd = openat(etc, "uvm.conf", O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { return "" }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { return "" }
        return readSmallFile("/proc/self/fd/\(fd)", limit: 64 << 10) ?? ""
    }

    /// How long a systemd instance may take to come up before sessions go in anyway.
    static let systemdBootLimit: Duration = .seconds(90)

    /// Sessions of a systemd instance start once what a login needs is up (as a login waits
    /// for systemd-user-sessions): the manager's private socket, the system D-Bus (after
    /// sysinit, so early boot's cleaning of /tmp is over too), and each lingering user's own
    /// manager. Not the whole boot: services such as dockerd take many seconds more under
    /// emulation, and socket activation makes their clients wait for them anyway.
    private static func waitForSystemd(_ instance: Instance) async {
        let deadline = ContinuousClock.now + systemdBootLimit
        var wanted = ["/run/systemd/private", "/run/dbus/system_bus_socket"]
        for uid in lingeringUIDs(instance) { wanted.append("/run/user/\(uid)/systemd/private") }
        for path in wanted {
            while access("\(instance.rootPath)\(path)", F_OK) != 0 {
                guard ContinuousClock.now < deadline, kill(instance.initPID, 0) == 0 else {
                    log("instance \(instance.name): no \(path) within \(systemdBootLimit): sessions go in")
                    return
                }
                try? await Task.sleep(for: .milliseconds(50))
            }
        }
    }

    /// The uids of the users in the instance's /var/lib/systemd/linger (`loginctl enable-linger`).
    private static func lingeringUIDs(_ instance: Instance) -> [uid_t] {
        guard let dir = opendir("\(instance.rootPath)/var/lib/systemd/linger") else { return [] }
        var names: [String] = []
        while let e = readdir(dir) {
            let n = direntName(e)
            if !n.hasPrefix(".") { names.append(n) }
        }
        closedir(dir)
        guard !names.isEmpty, let passwd = readSmallFile("\(instance.rootPath)/etc/passwd") else { return [] }
        return passwd.split(separator: "\n").compactMap { line in
            let f = line.split(separator: ":", omittingEmptySubsequences: false)
            return f.count > 2 && names.contains(String(f[0])) ? uid_t(f[2]) : nil
        }
    }

    /// `[boot] command`: run as root in the instance when it starts, in the background (WSL's).
    private static func runBootCommand(_ command: String, in instance: Instance) {
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { close(null) }
        let root = Account(name: "root", uid: 0, gid: 0, home: "/root", shell: "/bin/sh", groups: [0])
        do {
            let pid = try spawnProcess(argv: ["/bin/sh", "-c", command], env: ["PATH": ProcessSession.defaultPath, "HOME": "/root"],
                                       cwd: "/", fallbackCwd: "/", account: root, stdio: (null, null, null), tty: false,
                                       instancePID: instance.initPID, cgroup: instance.sessionCgroup)
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
            let name = direntName(entry)
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

/// A small file's text, at most `limit` bytes. Many of these paths are in a distro's file system,
/// which is the guest's to fill: a FIFO or a terminal there must not hold the agent (a session's
/// thread, and with two of them the whole cooperative pool), so the open and the reads do not
/// wait: a FIFO without a writer, or without data yet, reads as empty.
func readSmallFile(_ path: String, limit: Int = 1 << 20) -> String? {
    let fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
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

/// The fields of a /proc/PID/stat (or a task's) after the command's closing parenthesis, the
/// state first: "pid (comm) state ...", where the command may hold spaces and parentheses.
func procStatFields(_ path: String) -> [Substring]? {
    guard let stat = readSmallFile(path, limit: 4096), let close = stat.lastIndex(of: ")") else { return nil }
    return stat[stat.index(after: close)...].split(separator: " ")
}

extension String {
    var trimmed: String {
        var s = Substring(self)
        while let c = s.first, c.isWhitespace { s.removeFirst() }
        while let c = s.last, c.isWhitespace { s.removeLast() }
        return String(s)
    }
}
