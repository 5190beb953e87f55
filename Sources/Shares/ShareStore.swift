import Foundation
import Settings
import Wire

/// Which host folders are shared: the configured home share plus those added by
/// `uvm share add`, which are kept in a JSON file so that they survive restarts.
public struct ShareStore: Sendable {
    public let file: String
    public let homeShare: String?
    /// How many shares can be mounted at once (one 9P port each).
    public let capacity: Int

    public init(file: String, homeShare: String?, capacity: Int) {
        self.file = file
        self.homeShare = homeShare
        self.capacity = capacity
    }

    public static let homeName = "home"

    public struct Entry: Sendable, Equatable {
        public var spec: ShareSpec
        public var source: String  // "config" or "user"
        public init(spec: ShareSpec, source: String) {
            self.spec = spec
            self.source = source
        }
    }

    /// Every share in effect, home first.
    public func entries() throws -> [Entry] {
        var all: [Entry] = []
        if let home = homeShare {
            all.append(Entry(spec: ShareSpec(name: Self.homeName, path: home), source: "config"))
        }
        all += try userShares().map { Entry(spec: $0, source: "user") }
        return all
    }

    public func userShares() throws -> [ShareSpec] {
        guard let data = FileManager.default.contents(atPath: file) else { return [] }
        do {
            return try JSONDecoder().decode([ShareSpec].self, from: data)
        } catch {
            throw WireError(.internalError, "\(file) is not a valid share list (\(error)); fix or delete it")
        }
    }

    /// Validates and records a new share; returns it with its path made canonical.
    public func add(_ spec: ShareSpec) throws -> ShareSpec {
        guard Self.validName(spec.name) else {
            throw WireError(.badRequest, "bad share name '\(spec.name)': use letters, digits, '-', '_' or '.' (at most 32, not starting with '.')")
        }
        let all = try entries()
        if all.contains(where: { $0.spec.name == spec.name }) {
            let why = spec.name == Self.homeName && homeShare != nil ? " (the default home share; turn it off in the configuration to reuse the name)" : ""
            throw WireError(.badRequest, "a share named '\(spec.name)' exists already\(why); `uvm share remove \(spec.name)` first")
        }
        guard all.count < capacity else {
            throw WireError(.badRequest, "at most \(capacity) shares can be mounted; remove one first (`uvm share list`)")
        }
        var canonical = spec
        canonical.path = try Self.canonicalDirectory(spec.path)
        var users = try userShares()
        users.append(canonical)
        try save(users)
        return canonical
    }

    public func remove(_ name: String) throws {
        if name == Self.homeName && homeShare != nil {
            throw WireError(.badRequest, "'home' is the default share: turn it off with UVM_HOME_SHARE=off (or the configuration's homeShare) instead")
        }
        var users = try userShares()
        guard let i = users.firstIndex(where: { $0.name == name }) else {
            throw WireError(.notFound, "there is no share '\(name)' (`uvm share list` shows them)")
        }
        users.remove(at: i)
        try save(users)
    }

    private func save(_ shares: [ShareSpec]) throws {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        try FileManager.default.createDirectory(atPath: (file as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        // Atomic: a crash leaves the old list or the new one, never half of one.
        try e.encode(shares).write(to: URL(fileURLWithPath: file), options: .atomic)
    }

    public static func validName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 32 && name.first != "."
            && name.allSatisfy { ($0.isASCII && ($0.isLetter || $0.isNumber)) || $0 == "-" || $0 == "_" || $0 == "." }
    }

    /// The real path of an existing directory (symlinks resolved, so that the working-directory
    /// mapping compares like with like).
    public static func canonicalDirectory(_ path: String) throws -> String {
        guard path.hasPrefix("/") else { throw WireError(.badRequest, "\(path): the path must be absolute") }
        guard let real = realpath(path, nil) else {
            throw WireError(.notFound, "\(path): \(String(cString: strerror(errno)))")
        }
        defer { free(real) }
        let resolved = String(cString: real)
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: resolved, isDirectory: &isDir), isDir.boolValue else {
            throw WireError(.badRequest, "\(path) is not a directory")
        }
        return resolved
    }

    /// The host path matching guest path `guestPath` inside one of `shares` (the deepest wins);
    /// nil when it is in none, or is not a plain absolute path (the guest sent it: no "." or "..").
    public static func hostPath(forGuest guestPath: String, in shares: [ShareSpec]) -> String? {
        let parts = guestPath.split(separator: "/", omittingEmptySubsequences: true)
        guard guestPath.hasPrefix("/"), !parts.contains(where: { $0 == "." || $0 == ".." }) else { return nil }
        let clean = "/" + parts.joined(separator: "/")
        var best: (guest: String, root: String)? = nil
        for s in shares {
            let inside = clean == s.guestPath || clean.hasPrefix(s.guestPath + "/")
            guard inside, best == nil || s.guestPath.count > best!.guest.count else { continue }
            best = (s.guestPath, (try? canonicalDirectory(s.path)) ?? s.path)
        }
        guard let best else { return nil }
        let rest = clean.dropFirst(best.guest.count)
        return best.root + (rest.isEmpty ? "" : (best.root == "/" ? String(rest.dropFirst()) : String(rest)))
    }

    /// The guest path matching host directory `hostPath` (already canonical, as getcwd gives it),
    /// if it is inside one of `shares` (the deepest share wins).
    public static func guestPath(forHost hostPath: String, in shares: [ShareSpec]) -> String? {
        var best: (root: String, guest: String)? = nil
        for s in shares {
            let root = (try? canonicalDirectory(s.path)) ?? s.path
            let inside = hostPath == root || hostPath.hasPrefix(root == "/" ? "/" : root + "/")
            guard inside, best == nil || root.count > best!.root.count else { continue }
            best = (root, s.guestPath)
        }
        guard let best else { return nil }
        let rest = hostPath.dropFirst(best.root.count)
        return best.guest + (rest.isEmpty ? "" : (rest.hasPrefix("/") ? String(rest) : "/" + rest))
    }
}
