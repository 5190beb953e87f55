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

    /// uvmd deletes the tar a client names in an import: only a file directly in the spool folder.
    @Test func onlyImportFilesInTheSpoolFolderAreTaken() throws {
        let (store, root) = try store()
        defer { try? FileManager.default.removeItem(atPath: root) }
        let spool = store.paths.spoolDir
        #expect(store.paths.isSpoolFile("\(spool)/import-12-abc.tar"))
        // An export's scratch file is uvmd's own: no client can name it as an import's tar.
        #expect(store.paths.isSpoolFile("\(spool)/export-12-abc.tar", .export))
        #expect(!store.paths.isSpoolFile("\(spool)/export-12-abc.tar"))
        for bad in ["\(spool)/other.tar", "\(spool)/import-1/../../x", "\(spool)/sub/import-1.tar", "/etc/passwd",
                    "\(spool)import-1.tar", "\(root)/data/distros/x/disk.ext4"] {
            #expect(!store.paths.isSpoolFile(bad), "\(bad)")
        }
    }

    /// `uvm install`'s path: a recipe's small ext4 image becomes a disk of the requested size,
    /// with its files, marked as importing until the guest is done.
    @Test func aDiskFromAnImageHasItsFilesAndTheRequestedSize() throws {
        let (store, root) = try store()
        defer { try? FileManager.default.removeItem(atPath: root) }
        try FileManager.default.createDirectory(atPath: "\(root)/src/etc", withIntermediateDirectories: true)
        try Data("ID=test\n".utf8).write(to: URL(fileURLWithPath: "\(root)/src/etc/os-release"))
        let image = "\(root)/img.ext4"
        let mke2fs = Process()
        mke2fs.executableURL = URL(fileURLWithPath: "/usr/sbin/mke2fs")
        mke2fs.arguments = ["-q", "-F", "-t", "ext4", "-d", "\(root)/src", image, "16M"]
        try mke2fs.run()
        mke2fs.waitUntilExit()
        try #require(mke2fs.terminationStatus == 0)
        try store.createEmptyDisk("img", sizeBytes: 256 << 20, from: image)
        #expect(store.availability("img") == .importing)
        #expect(store.diskUsage("img").size == 256 << 20)
        let dump = Process()
        let out = Pipe()
        dump.executableURL = URL(fileURLWithPath: "/usr/sbin/debugfs")
        dump.arguments = ["-R", "cat /etc/os-release", store.paths.distroDisk("img")]
        dump.standardOutput = out
        dump.standardError = FileHandle.nullDevice
        try dump.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        dump.waitUntilExit()
        #expect(text == "ID=test\n")
        // A copy that fails (no such image) leaves the claim for the caller to delete.
        #expect(throws: DistroStore.InstallError.self) { try store.createEmptyDisk("gone", sizeBytes: 256 << 20, from: "\(root)/nothing.ext4") }
    }

    @Test func aFailedCopyLeavesNothingInstalled() throws {
        let (store, root) = try store()
        defer { try? FileManager.default.removeItem(atPath: root) }
        #expect(throws: DistroStore.InstallError.self) { try store.install("ghost", from: "\(root)/images/missing.ext4") }
        #expect(store.availability("ghost") == .absent)
        #expect(!FileManager.default.fileExists(atPath: "\(root)/data/distros/ghost/disk.ext4.partial"))
    }
}
