import Foundation
import Shares
import Testing
import Wire

@Suite struct ShareStoreTests {
    let dir: String
    let store: ShareStore

    init() throws {
        dir = NSTemporaryDirectory() + "uvm-shares-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir + "/home/proj/src", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: dir + "/data", withIntermediateDirectories: true)
        store = ShareStore(file: dir + "/state/shares.json", homeShare: dir + "/home", capacity: 3)
    }

    @Test func homeIsThereByDefaultAndCannotBeRemoved() throws {
        #expect(try store.entries().map(\.spec.name) == ["home"])
        #expect(throws: WireError.self) { try store.remove("home") }
        let none = ShareStore(file: dir + "/x.json", homeShare: nil, capacity: 3)
        #expect(try none.entries().isEmpty)
    }

    @Test func addPersistsCanonicalPathAndRemoveForgets() throws {
        try FileManager.default.createSymbolicLink(atPath: dir + "/link", withDestinationPath: dir + "/data")
        let added = try store.add(ShareSpec(name: "data", path: dir + "/link", readOnly: true))
        #expect(added.path == (try ShareStore.canonicalDirectory(dir + "/data")))
        // A second store reading the same file (a restarted uvmd) sees it.
        let again = ShareStore(file: dir + "/state/shares.json", homeShare: nil, capacity: 3)
        #expect(try again.entries() == [ShareStore.Entry(spec: added, source: "user")])
        try store.remove("data")
        #expect(try again.entries().isEmpty)
        #expect(throws: WireError.self) { try store.remove("data") }
    }

    @Test func badSharesAreRefusedWithReasons() throws {
        func message(_ spec: ShareSpec) -> String {
            do { _ = try store.add(spec); return "" } catch let e as WireError { return e.message } catch { return "\(error)" }
        }
        #expect(message(ShareSpec(name: "../x", path: dir + "/data")).contains("bad share name"))
        #expect(message(ShareSpec(name: ".hidden", path: dir + "/data")).contains("bad share name"))
        #expect(message(ShareSpec(name: "a", path: "relative/path")).contains("absolute"))
        #expect(message(ShareSpec(name: "a", path: dir + "/missing")).contains("No such file"))
        FileManager.default.createFile(atPath: dir + "/file", contents: Data())
        #expect(message(ShareSpec(name: "a", path: dir + "/file")).contains("not a directory"))
        #expect(message(ShareSpec(name: "home", path: dir + "/data")).contains("exists already"))
        _ = try store.add(ShareSpec(name: "one", path: dir + "/data"))
        _ = try store.add(ShareSpec(name: "two", path: dir + "/data"))
        #expect(message(ShareSpec(name: "three", path: dir + "/data")).contains("at most 3"))
        #expect(try store.entries().map(\.spec.name) == ["home", "one", "two"])
    }

    @Test func corruptListIsAnErrorNotAnEmptyList() throws {
        try FileManager.default.createDirectory(atPath: dir + "/state", withIntermediateDirectories: true)
        try Data("{not json".utf8).write(to: URL(fileURLWithPath: dir + "/state/shares.json"))
        #expect(throws: WireError.self) { try store.entries() }
    }

    @Test func hostDirectoriesMapIntoTheDeepestShare() throws {
        let home = try ShareStore.canonicalDirectory(dir + "/home")
        let shares = [ShareSpec(name: "home", path: home), ShareSpec(name: "proj", path: home + "/proj")]
        #expect(ShareStore.guestPath(forHost: home, in: shares) == "/mnt/host/home")
        #expect(ShareStore.guestPath(forHost: home + "/proj/src", in: shares) == "/mnt/host/proj/src")
        #expect(ShareStore.guestPath(forHost: home + "/projx", in: shares) == "/mnt/host/home/projx")
        #expect(ShareStore.guestPath(forHost: "/elsewhere", in: shares) == nil)
        #expect(ShareStore.guestPath(forHost: home + "x", in: shares) == nil)
    }

    /// uvm-host's working directory: the guest sent it, so only plain paths inside a share map.
    @Test func guestPathsMapBackToTheirShare() throws {
        let home = try ShareStore.canonicalDirectory(dir + "/home")
        let shares = [ShareSpec(name: "home", path: home), ShareSpec(name: "proj", path: home + "/proj")]
        #expect(ShareStore.hostPath(forGuest: "/mnt/host/home", in: shares) == home)
        #expect(ShareStore.hostPath(forGuest: "/mnt/host/home/a//b/", in: shares) == home + "/a/b")
        #expect(ShareStore.hostPath(forGuest: "/mnt/host/proj/src", in: shares) == home + "/proj/src")
        for outside in ["/mnt/host", "/mnt/host/homex", "/tmp", "relative", "/mnt/host/home/../../etc", "/mnt/host/home/./x"] {
            #expect(ShareStore.hostPath(forGuest: outside, in: shares) == nil, "\(outside)")
        }
        let root = [ShareSpec(name: "all", path: "/")]
        #expect(ShareStore.hostPath(forGuest: "/mnt/host/all/etc", in: root) == "/etc")
        #expect(ShareStore.hostPath(forGuest: "/mnt/host/all", in: root) == "/")
    }
}
