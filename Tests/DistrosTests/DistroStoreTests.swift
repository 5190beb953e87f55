import Foundation
import Testing

import Distros
import Settings

@Suite struct DistroStoreTests {
    /// A scratch UVM_HOME-style tree with an images folder.
    func store(_ name: String = #function, defaultDistro: String = "busybox") throws -> (DistroStore, String) {
        let root = "/tmp/uvm-distros-\(getpid())-\(name.filter(\.isLetter))"
        try? FileManager.default.removeItem(atPath: root)
        try FileManager.default.createDirectory(atPath: "\(root)/images", withIntermediateDirectories: true)
        var paths = Paths(home: root, stateDir: "\(root)/state", dataDir: "\(root)/data", cacheDir: "\(root)/cache", configFile: "\(root)/uvm.conf")
        paths.imagesOverride = "\(root)/images"
        return (DistroStore(paths: paths, defaultDistro: defaultDistro), root)
    }

    @Test func theDefaultIsInstalledFromItsTemplateOnce() throws {
        let (store, root) = try store()
        defer { try? FileManager.default.removeItem(atPath: root) }
        #expect(store.availability("busybox") == .absent)
        #expect(throws: DistroStore.InstallError.self) { try store.prepareForBoot() }
        try Data("template bytes".utf8).write(to: URL(fileURLWithPath: "\(root)/images/busybox.ext4"))
        #expect(store.availability("busybox") == .template(path: "\(root)/images/busybox.ext4"))
        #expect(store.installed().isEmpty)
        let booted = try store.prepareForBoot()
        #expect(booted.map(\.name) == ["busybox"])
        #expect(FileManager.default.contents(atPath: booted[0].disk) == Data("template bytes".utf8))
        #expect(!FileManager.default.fileExists(atPath: booted[0].disk + ".partial"))
        // A disk the user has changed is never overwritten by the template.
        try Data("changed".utf8).write(to: URL(fileURLWithPath: booted[0].disk))
        _ = try store.prepareForBoot()
        #expect(FileManager.default.contents(atPath: booted[0].disk) == Data("changed".utf8))
    }

    @Test func onlyValidNamesWithADiskCount() throws {
        let (store, root) = try store()
        defer { try? FileManager.default.removeItem(atPath: root) }
        for name in ["alpha", ".hidden", "no-disk"] {
            try FileManager.default.createDirectory(atPath: "\(root)/data/distros/\(name)", withIntermediateDirectories: true)
            if name != "no-disk" { FileManager.default.createFile(atPath: "\(root)/data/distros/\(name)/disk.ext4", contents: Data()) }
        }
        #expect(store.installed().map(\.name) == ["alpha"])
        #expect(store.listed() == ["alpha", "busybox"])
        #expect(store.knows("alpha") && !store.knows("no-disk") && !store.knows("../etc"))
    }

    @Test func aFailedCopyLeavesNothingInstalled() throws {
        let (store, root) = try store()
        defer { try? FileManager.default.removeItem(atPath: root) }
        #expect(throws: DistroStore.InstallError.self) { try store.install("ghost", from: "\(root)/images/missing.ext4") }
        #expect(store.availability("ghost") == .absent)
        #expect(!FileManager.default.fileExists(atPath: "\(root)/data/distros/ghost/disk.ext4.partial"))
    }
}
