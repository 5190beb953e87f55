// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "uvm",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "uvm", targets: ["uvm"]),
        .executable(name: "uvmd", targets: ["uvmd"]),
        .executable(name: "uvm-init", targets: ["uvm-init"]),
        .executable(name: "uvm-9p", targets: ["uvm-9p"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-http2.git", from: "1.46.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
    ],
    targets: [
        // libvirt's C API, from Debian's libvirt-dev.
        .systemLibrary(name: "CLibvirt", pkgConfig: "libvirt", providers: [.apt(["libvirt-dev"])]),
        // Syscalls that must run between fork and exec (namespaces, pty, mounts), or that Glibc's overlay lacks:
        // only async-signal-safe C belongs there, so it is C, not Swift.
        .target(name: "CSyscalls"),

        // The host<->guest and CLI<->uvmd protocol: frames, messages, the HTTP/2 stream glue.
        .target(name: "Wire", dependencies: [
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOHTTP2", package: "swift-nio-http2"),
            .product(name: "NIOHPACK", package: "swift-nio-http2"),
        ]),
        // Where things live and what the user configured.
        .target(name: "Settings"),
        // GLib, for GKeyFile: it reads the INI format of uvm.conf (WSL's .wslconfig style).
        .systemLibrary(name: "CGLib", pkgConfig: "glib-2.0", providers: [.apt(["libglib2.0-dev"])]),
        // uvm.conf: defaults < the file < UVM_* variables, with where each setting came from.
        .target(name: "Config", dependencies: ["Settings", "CGLib"]),
        // Distributions: which ones this user has, their disks, the default (DistroStore).
        .target(name: "Distros", dependencies: ["Settings", "CSyscalls"]),
        // The idle reaper: counts clients per distro instance; stops idle instances, then the VM.
        .target(name: "Reaper"),
        // The utility VM through libvirt: domain XML, lifecycle, events, accelerator choice.
        .target(name: "HostCompute", dependencies: [
            "CLibvirt",
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Linux syscalls the Glibc overlay lacks (openat2, getdents64, statx, xattrs, OFD locks).
        .target(name: "CPlan9"),
        // 9P2000.L file server exporting host folders.
        .target(name: "Plan9", dependencies: [
            "CPlan9",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The host end of the guest kernel's uvmshm 9P transport (rings in ivshmem shared memory):
        // the ivshmem server protocol and one pump thread per channel, in C because they work on
        // memory the guest writes at any time.
        .target(name: "CShmRing"),
        // Shared host folders: which ones (kept across restarts) and their 9P ports while the VM runs.
        .target(name: "Shares", dependencies: [
            "Wire", "Settings", "Plan9", "CShmRing", "CSyscalls",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // uvmd: the socket API, the VM it owns, the sessions relayed into the guest.
        .target(name: "Daemon", dependencies: [
            "Wire", "Settings", "Config", "Distros", "Reaper", "HostCompute", "Shares", "CSyscalls",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP2", package: "swift-nio-http2"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // uvm-init: PID 1 in the guest.
        .target(name: "GuestAgent", dependencies: [
            "Wire", "CSyscalls", "Archive", "Plan9",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP2", package: "swift-nio-http2"),
        ]),
        // Root file system tarballs for `uvm import`/`uvm export`: a streaming pax writer and a
        // push-based extractor confined to its destination. No Foundation: it goes into uvm-init.
        .target(name: "Archive", dependencies: ["CSyscalls"]),
        // libfuse3's C API, from Debian's libfuse3-dev (`uvm mount`).
        .systemLibrary(name: "CFuse", pkgConfig: "fuse3", providers: [.apt(["libfuse3-dev"])]),
        // `uvm mount`: a distro's files on the host, a FUSE file system speaking 9P to the guest
        // agent through uvmd.
        .target(name: "HostMount", dependencies: [
            "CFuse", "Plan9", "Wire",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),
        // The `uvm` command's subcommands and its connection to uvmd (auto-launch included).
        .target(name: "UVMCLI", dependencies: [
            "Wire", "Settings", "Distros", "CSyscalls", "Archive", "HostMount",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        .executableTarget(
            name: "uvm", dependencies: ["UVMCLI"],
            // Started for every command: a static Swift runtime saves the dynamic loader's work.
            linkerSettings: [
                .unsafeFlags(["-static-stdlib"]),
                .linkedLibrary("_FoundationCollections"), .linkedLibrary("_FoundationCShims"),
            ]),
        .executableTarget(name: "uvmd", dependencies: [
            "Daemon", "Config", "Settings", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ],
            // Installed (make install, the .deb) where no Swift toolchain is: a static runtime.
            // Foundation's static archive does not autolink CoreFoundation and its other helpers.
            linkerSettings: [
                .unsafeFlags(["-static-stdlib"]),
                .linkedLibrary("CoreFoundation"), .linkedLibrary("FoundationInternationalization"), .linkedLibrary("_FoundationICU"),
                .linkedLibrary("_FoundationCollections"), .linkedLibrary("_FoundationCShims"),
            ]),
        .executableTarget(
            name: "uvm-init", dependencies: ["GuestAgent"],
            // PID 1 in a bare initramfs, linked fully static: no dynamic loader, relocations or
            // shared libraries to load at every boot (under TCG that is emulated work), and an
            // initramfs 6.8 MB smaller (21.9 MB) for the kernel to unpack. It needs nothing that
            // static glibc loads at run time (no NSS lookups, no dlopen).
            linkerSettings: [
                .unsafeFlags(["-static-executable"]),
                // FoundationEssentials' static archive does not autolink its helpers.
                .linkedLibrary("_FoundationCollections"), .linkedLibrary("_FoundationCShims"),
            ]
        ),
        .executableTarget(name: "uvm-9p", dependencies: [
            "Plan9", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        .testTarget(name: "WireTests", dependencies: ["Wire"]),
        .testTarget(name: "HostComputeTests", dependencies: ["HostCompute"]),
        .testTarget(name: "Plan9Tests", dependencies: [
            "Plan9", "CPlan9",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ], exclude: ["corpus"]),
        .testTarget(name: "SharesTests", dependencies: ["Shares", "Wire", "CShmRing", "CSyscalls"]),
        // Fixtures are built by the tests themselves (statically, to run in the guest).
        .testTarget(name: "EndToEndTests", dependencies: ["Wire", "Settings"], exclude: ["Fixtures"]),
        .testTarget(name: "ConfigTests", dependencies: ["Config", "Settings"]),
        .testTarget(name: "ReaperTests", dependencies: ["Reaper"]),
        .testTarget(name: "ArchiveTests", dependencies: ["Archive", "CSyscalls"]),
        .testTarget(name: "DistrosTests", dependencies: ["Distros", "Settings"]),
        // Daemon logic against a fake guest agent: no VM.
        .testTarget(name: "DaemonTests", dependencies: [
            "Daemon", "Wire", "Settings", "Shares", "Reaper", "Plan9",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // uvm-init's spawn path driven on the host, in a process of its own (see SpawnSoakTests).
        .executableTarget(name: "spawn-soak", dependencies: ["GuestAgent"], path: "Tests/SpawnSoak"),
        .testTarget(name: "GuestAgentTests", dependencies: ["spawn-soak", "GuestAgent"]),
    ]
)
