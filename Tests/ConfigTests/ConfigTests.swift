import Config
import Foundation
import Settings
import Testing

/// uvm.conf through GKeyFile: values, durations, precedence, and errors that name file, line and key.
@Suite struct ConfigTests {
    /// Writes `text` as a config file and loads it with `env` (UVM_CONFIG pointing to it).
    func load(_ text: String, env: [String: String] = [:]) throws(ConfigError) -> LoadedSettings {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("uvm-config-\(getpid())-\(UUID().uuidString)")
        try? FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let file = dir.appendingPathComponent("uvm.conf").path
        FileManager.default.createFile(atPath: file, contents: Data(text.utf8))
        var e = env
        e["UVM_CONFIG"] = file
        e["HOME"] = dir.path
        return try Config.load(paths: .current(e), env: e)
    }

    func error(_ text: String) -> ConfigError? {
        do { _ = try load(text); return nil } catch { return error }
    }

    @Test func defaultsWithoutAFile() throws {
        let e = ["HOME": "/nonexistent-home", "XDG_CONFIG_HOME": "/nonexistent-config"]
        let l = try Config.load(paths: .current(e), env: e)
        #expect(!l.fileExists)
        #expect(l.settings.vmIdleTimeout == .seconds(60))
        #expect(l.settings.instanceIdleTimeout == .seconds(15))
        #expect(l.settings.localhostForwarding)
        #expect(l.source(of: Settings.schema[0]) == .builtIn)
    }

    @Test func readsEveryKnownKey() throws {
        let l = try load("""
            # WSL style
            [vm]
            memory = 3GB
            processors=2
            kernel = /boot/vmlinuz-test
            kernelCommandLine = "quiet debug"
            accel = tcg
            vmIdleTimeout = 2s
            localhostForwarding = false

            [general]
            instanceIdleTimeout = 500ms
            defaultDistro = debian
            """)
        let s = l.settings
        #expect(s.memoryMiB == 3072)
        #expect(s.processors == 2)
        #expect(s.kernel == "/boot/vmlinuz-test")
        #expect(s.kernelCommandLine == "quiet debug")
        #expect(s.accel == "tcg")
        #expect(s.vmIdleTimeout == .seconds(2))
        #expect(s.localhostForwarding == false)
        #expect(s.instanceIdleTimeout == .milliseconds(500))
        #expect(s.defaultDistro == "debian")
        let memory = try #require(Settings.schema.first { $0.id == "vm.memory" })
        #expect(l.source(of: memory) == .file(path: l.file, line: 3))
        let distro = try #require(Settings.schema.first { $0.id == "general.defaultDistro" })
        #expect(l.source(of: distro) == .file(path: l.file, line: 13))
    }

    @Test func durationsAsWSLWritesThem() throws {
        #expect(try parseTimeout("2s") == .seconds(2))
        #expect(try parseTimeout("500ms") == .milliseconds(500))
        #expect(try parseTimeout("1m") == .seconds(60))
        #expect(try parseTimeout("1500") == .milliseconds(1500))
        #expect(try parseTimeout("0.5s") == .milliseconds(500))
        #expect(try parseTimeout("never") == nil)
        #expect(try parseTimeout("-1") == nil)
        #expect(try parseTimeout("-5s") == nil)
        #expect(throws: SettingValueError.self) { try parseTimeout("soon") }
        #expect(throws: SettingValueError.self) { try parseTimeout("2 weeks") }
        #expect(formatTimeout(.milliseconds(500)) == "500ms")
        #expect(formatTimeout(.seconds(120)) == "2m")
        #expect(formatTimeout(nil) == "never")
    }

    /// WSL's autoMemoryReclaim values (case as WSL users write them, or not), and its delay.
    @Test func memoryReclaimSettings() throws {
        #expect(Settings().autoMemoryReclaim == "dropCache")
        let l = try load("[vm]\nautoMemoryReclaim = Gradual\nautoMemoryReclaimDelay = 30s\n")
        #expect(l.settings.autoMemoryReclaim == "gradual")
        #expect(l.settings.autoMemoryReclaimDelay == .seconds(30))
        let bad = try #require(error("[vm]\nautoMemoryReclaim = sometimes\n"))
        #expect(bad.line == 2 && bad.description.contains("expected dropCache, gradual or disabled"))
        let never = try #require(error("[vm]\nautoMemoryReclaimDelay = never\n"))
        #expect(never.description.contains("autoMemoryReclaim = disabled"))
        #expect(PageReportingPace(environment: "") == .uvm)
        #expect(PageReportingPace(environment: "upstream") == .upstream)
        #expect(PageReportingPace(environment: "5,,4") == PageReportingPace(order: 5, delayMilliseconds: 250, budgetDivisor: 4))
    }

    @Test func sizes() throws {
        #expect(try parseMemory("4GB") == 4096)
        #expect(try parseMemory("512MB") == 512)
        #expect(try parseMemory("1g") == 1024)
        #expect(try parseMemory("\(256 << 20)") == 256)  // plain bytes, as in WSL
        #expect(throws: SettingValueError.self) { try parseMemory("64MB") }
        #expect(throws: SettingValueError.self) { try parseMemory("lots") }
    }

    @Test func unknownKeyNamesFileLineAndKey() throws {
        let e = try #require(error("[vm]\nmemory = 4GB\n\nmemroy = 2GB\n"))
        #expect(e.line == 4)
        #expect(e.key == "[vm] memroy")
        #expect(e.description.contains("uvm.conf:4: [vm] memroy: unknown key"))
        #expect(e.description.contains("memory"))  // the known keys are listed
    }

    @Test func unknownSection() throws {
        let e = try #require(error("[wsl2]\nmemory = 4GB\n"))
        #expect(e.line == 2)
        #expect(e.description.contains("unknown section [wsl2]"))
    }

    @Test func keyInTheWrongSection() throws {
        let e = try #require(error("[general]\nmemory = 4GB\n"))
        #expect(e.key == "[general] memory")
        #expect(e.line == 2)
    }

    @Test func badValuesNameTheKey() throws {
        let t = try #require(error("[general]\ndefaultDistro = busybox\n[vm]\nvmIdleTimeout = soon\n"))
        #expect(t.line == 4)
        #expect(t.description.contains("[vm] vmIdleTimeout: bad value 'soon'"))
        let b = try #require(error("[vm]\nlocalhostForwarding = maybe\n"))
        #expect(b.description.contains(":2: [vm] localhostForwarding: bad value 'maybe': expected true or false"))
        let a = try #require(error("[vm]\naccel = hvf\n"))
        #expect(a.description.contains("expected auto, kvm or tcg"))
    }

    @Test func syntaxErrorsHaveALine() throws {
        let e = try #require(error("[vm]\nmemory = 4GB\nthis is not a setting\n"))
        #expect(e.line == 3)
        let before = try #require(error("memory = 4GB\n[vm]\n"))
        #expect(before.line == 1)
    }

    @Test func keysAreCaseInsensitiveAsInWSL() throws {
        let l = try load("[VM]\nMemory = 1GB\n")
        #expect(l.settings.memoryMiB == 1024)
    }

    @Test func environmentOverridesTheFile() throws {
        let l = try load("[vm]\nvmIdleTimeout = 2s\nmemory = 1GB\n", env: ["UVM_VM_IDLE_TIMEOUT": "never", "UVM_MEMORY_MB": "512"])
        #expect(l.settings.vmIdleTimeout == nil)
        #expect(l.settings.memoryMiB == 512)
        let key = try #require(Settings.schema.first { $0.id == "vm.vmIdleTimeout" })
        #expect(l.source(of: key) == .environment("UVM_VM_IDLE_TIMEOUT"))
        #expect(throws: ConfigError.self) { try load("", env: ["UVM_INSTANCE_IDLE_TIMEOUT": "soon"]) }
    }

    @Test func aNamedFileMustExist() throws {
        let e = ["UVM_CONFIG": "/nonexistent/uvm.conf", "HOME": "/nonexistent"]
        #expect(throws: ConfigError.self) { try Config.load(paths: .current(e), env: e) }
    }

    @Test func showListsEverySettingWithItsSource() throws {
        let l = try load("[vm]\nprocessors = 3\n")
        let text = Config.describe(l)
        #expect(text.contains("processors = 3"))
        #expect(text.contains("uvm.conf:2"))
        #expect(text.contains("[general]"))
        #expect(text.contains("instanceIdleTimeout = 15s"))
        #expect(text.contains("# default"))
    }

    /// uvm's own kernel boots as the vmlinux beside its bzImage (PVH: no decompression in the
    /// emulated guest); without one, or for a kernel not named bzImage, the image as given.
    @Test func bootsTheVmlinuxBesideTheBzImage() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("uvm-kernel-\(getpid())-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(FileManager.default.createFile(atPath: "\(dir)/bzImage", contents: Data("b".utf8)))
        #expect(Paths.bootImage(for: "\(dir)/bzImage") == "\(dir)/bzImage")
        #expect(FileManager.default.createFile(atPath: "\(dir)/vmlinux", contents: Data("v".utf8)))
        #expect(Paths.bootImage(for: "\(dir)/bzImage") == "\(dir)/vmlinux")
        #expect(FileManager.default.createFile(atPath: "\(dir)/mykernel", contents: Data("k".utf8)))
        #expect(Paths.bootImage(for: "\(dir)/mykernel") == "\(dir)/mykernel")
    }
}
