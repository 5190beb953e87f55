#if canImport(Glibc)
import Glibc
#endif

/// Why this process cannot open /dev/kvm, in terms of what the user can do about it: an ordinary
/// account reaches KVM through group `kvm`, and a group added with `usermod` only counts after
/// the next login.
public struct KVMAccess: Sendable, Equatable {
    public var userName: String
    /// The device's group and mode (e.g. "kvm", 0o660).
    public var deviceGroup: String
    public var deviceMode: UInt32
    /// Group `kvm` exists in the group database.
    public var groupExists: Bool
    /// The user is listed in group `kvm` (or has it as primary group) in the group database.
    public var memberInDatabase: Bool
    /// This process carries group `kvm` (it logged in after being added).
    public var memberInProcess: Bool

    /// One sentence: what is wrong and the exact commands that fix it.
    public var advice: String {
        if !groupExists {
            return "there is no group kvm; as root: `groupadd --system kvm && chgrp kvm /dev/kvm && chmod 660 /dev/kvm`, "
                + "then `usermod -aG kvm \(userName)` and log in again"
        }
        if deviceGroup != "kvm" || deviceMode & 0o060 != 0o060 {
            let fix = "as root: `chgrp kvm /dev/kvm && chmod 660 /dev/kvm` (what udev does on a normal distribution)"
            return "/dev/kvm is group \(deviceGroup), mode \(String(deviceMode & 0o777, radix: 8)): \(fix)"
                + (memberInDatabase ? "" : "; and `sudo usermod -aG kvm,libvirt \(userName)`, then log in again")
        }
        if !memberInDatabase {
            return "\(userName) is not in group kvm: run `sudo usermod -aG kvm,libvirt \(userName)`, then log in again"
        }
        if !memberInProcess {
            return "\(userName) is in group kvm, but this login started before that: log in again (or run `newgrp kvm`)"
        }
        return "/dev/kvm cannot be opened read-write although \(userName) is in group kvm and the mode is "
            + String(deviceMode & 0o777, radix: 8) + " (an ACL or a security module?)"
    }

    /// This process, this user, this device.
    public static func current(device: String = "/dev/kvm") -> KVMAccess {
        var st = stat()
        let statOK = stat(device, &st) == 0
        let deviceGroup = statOK ? groupName(st.st_gid) : "?"
        let uid = geteuid()
        var userName = "uid \(uid)"
        var primary: gid_t = getegid()
        if let pw = getpwuid(uid) {
            userName = String(cString: pw.pointee.pw_name)
            primary = pw.pointee.pw_gid
        }
        var exists = false, inDB = false, inProcess = false
        if let gr = getgrnam("kvm") {
            exists = true
            let gid = gr.pointee.gr_gid
            inDB = primary == gid
            var member = gr.pointee.gr_mem
            while let m = member?.pointee {
                if String(cString: m) == userName { inDB = true }
                member = member?.advanced(by: 1)
            }
            let n = getgroups(0, nil)
            var groups = [gid_t](repeating: 0, count: Int(max(n, 0)))
            let got = getgroups(n, &groups)
            inProcess = getegid() == gid || groups.prefix(Int(max(got, 0))).contains(gid)
        }
        return KVMAccess(userName: userName, deviceGroup: deviceGroup, deviceMode: UInt32(st.st_mode),
                         groupExists: exists, memberInDatabase: inDB, memberInProcess: inProcess)
    }

    private static func groupName(_ gid: gid_t) -> String {
        guard let gr = getgrgid(gid) else { return String(gid) }
        return String(cString: gr.pointee.gr_name)
    }
}
