// swift-tools-version: 6.2
import PackageDescription

// The `NativeCPU` trait (on by default) compiles the library and the benchmark for the
// build machine's CPU (`-target-cpu native`) and defines `EA_FMA`, under which the
// kernels use fused multiply-add (`addProduct`). `--disable-default-traits` gives a
// portable build: baseline x86-64 / arm64 code, plain `acc += a * b`.
let nativeSettings: [SwiftSetting] = [
    .unsafeFlags(["-target-cpu", "native"], .when(traits: ["NativeCPU"])),
    .define("EA_FMA", .when(traits: ["NativeCPU"])),
]

let package = Package(
    name: "swift-efficient-attention",
    platforms: [.macOS(.v13), .macCatalyst(.v16), .iOS(.v16), .tvOS(.v16), .watchOS(.v9), .visionOS(.v1)],
    products: [
        .library(name: "EfficientAttention", targets: ["EfficientAttention"]),
        .executable(name: "attention-bench", targets: ["AttentionBench"]),
        .executable(name: "attention-fuzz", targets: ["AttentionFuzz"]),
    ],
    traits: [
        .trait(name: "NativeCPU",
               description: "Compile kernels for the build machine's CPU and use fused multiply-add."),
        .default(enabledTraits: ["NativeCPU"]),
    ],
    targets: [
        // `__builtin_prefetch` for the gather kernels (an `llvm.prefetch` declaration in
        // Swift does not pass LLVM's verifier under -sanitize=thread).
        .target(name: "CEfficientAttention"),
        .target(name: "EfficientAttention", dependencies: ["CEfficientAttention"], swiftSettings: nativeSettings),
        .systemLibrary(name: "CMallocInfo", path: "Benchmarks/CMallocInfo"),
        .target(
            name: "AttentionBenchCore",
            dependencies: ["EfficientAttention", "CMallocInfo"],
            path: "Benchmarks/AttentionBenchCore",
            swiftSettings: nativeSettings),
        .executableTarget(
            name: "AttentionBench",
            dependencies: ["EfficientAttention", "AttentionBenchCore"],
            path: "Benchmarks/AttentionBench",
            swiftSettings: nativeSettings),
        .executableTarget(
            name: "AttentionFuzz",
            dependencies: ["EfficientAttention", "AttentionBenchCore"],
            path: "Benchmarks/AttentionFuzz",
            swiftSettings: nativeSettings),
        .testTarget(
            name: "EfficientAttentionTests",
            dependencies: ["EfficientAttention", "AttentionBenchCore"]),
    ]
)
