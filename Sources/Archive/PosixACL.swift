/// POSIX ACLs as tar writers put them in pax (SCHILY.acl.access / SCHILY.acl.default: star's,
/// GNU tar's --acls and bsdtar's text form) turned into the system.posix_acl_* xattr value the
/// kernel takes. Only numeric qualifiers can be used (a 4th numeric field, as libarchive and star
/// write, or a number in place of the name): names would need the destination's passwd.
enum PosixACL {
    // Tags of the xattr form, in the order the kernel requires.
    static let userObj: UInt16 = 0x01, user: UInt16 = 0x02, groupObj: UInt16 = 0x04, group: UInt16 = 0x08
    static let mask: UInt16 = 0x10, other: UInt16 = 0x20

    /// The xattr value, or nil when the text does not parse or names someone only by name.
    static func xattr(fromText text: [UInt8]) -> [UInt8]? {
        var entries: [(tag: UInt16, perm: UInt16, id: UInt32)] = []
        for raw in text.split(whereSeparator: { $0 == 0x2C || $0 == 0x0A }) {
            // Drop a trailing "#comment" (acl_to_text's effective-rights note).
            let entry = raw.prefix { $0 != 0x23 }.filter { $0 != 0x20 && $0 != 0x09 }
            if entry.isEmpty { continue }
            let f = entry.split(separator: 0x3A, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
            guard f.count == 3 || f.count == 4 else { return nil }
            guard let perm = perms(f[2]) else { return nil }
            let qualified = !f[1].isEmpty
            var id = UInt32.max
            if qualified {
                guard let n = UInt32(f.count == 4 ? f[3] : f[1]) else { return nil }
                id = n
            }
            let tag: UInt16
            switch (f[0], qualified) {
            case ("user", false), ("u", false): tag = userObj
            case ("user", true), ("u", true): tag = user
            case ("group", false), ("g", false): tag = groupObj
            case ("group", true), ("g", true): tag = group
            case ("mask", _), ("m", _): tag = mask; id = .max
            case ("other", _), ("o", _): tag = other; id = .max
            default: return nil
            }
            entries.append((tag, perm, id))
        }
        guard !entries.isEmpty else { return nil }
        entries.sort { ($0.tag, $0.id) < ($1.tag, $1.id) }
        var out: [UInt8] = [2, 0, 0, 0]  // POSIX_ACL_XATTR_VERSION, little-endian
        for e in entries {
            out += [UInt8(e.tag & 0xff), UInt8(e.tag >> 8), UInt8(e.perm & 0xff), UInt8(e.perm >> 8)]
            out += [UInt8(e.id & 0xff), UInt8((e.id >> 8) & 0xff), UInt8((e.id >> 16) & 0xff), UInt8(e.id >> 24)]
        }
        return out
    }

    private static func perms(_ s: String) -> UInt16? {
        var p: UInt16 = 0
        for c in s {
            switch c {
            case "r": p |= 4
            case "w": p |= 2
            case "x": p |= 1
            case "-": break
            default: return nil
            }
        }
        return p
    }
}
