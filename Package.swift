// swift-tools-version: 6.2
import PackageDescription

// Code generation (KernelDocs/Portability.md). The default build targets the baseline of
// the platform (x86-64: SSE2; arm64: NEON), so a program that depends on this package runs
// on any CPU of its architecture, wherever it was built. The `NativeCPU` trait compiles the
// library and the benchmark for the build machine's CPU (`-target-cpu native`, AVX-512 or
// AVX2 on x86-64) and defines `EA_FMA`, under which the kernels use fused multiply-add
// (`addProduct`): faster (KernelDocs/Portability.md), but such a binary dies with an illegal instruction
// on a CPU that lacks the build machine's features. The README's benchmark command uses it.
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
               description: """
                   Compile for the build machine's CPU and use fused multiply-add: fast, but the \
                   binary runs only on CPUs with the build machine's features.
                   """),
        .default(enabledTraits: []),
    ],
    targets: [
        // `__builtin_prefetch` for the gather kernels (an `llvm.prefetch` declaration in
        // Swift does not pass LLVM's verifier under -sanitize=thread).
        .target(name: "CEfficientAttention"),
        .target(name: "EfficientAttention", dependencies: ["CEfficientAttention"], swiftSettings: nativeSettings),
        .systemLibrary(name: "CMallocInfo", path: "Benchmarks/CMallocInfo"),
        // Counts the process's heap allocations (malloc interposed on glibc) for the
        // benchmark's allocations-per-call column and the zero-allocation tests; never
        // part of the library.
        .target(name: "CAllocationCounter", dependencies: ["CEfficientAttention"], path: "Benchmarks/CAllocationCounter"),
        .target(
            name: "AttentionBenchCore",
            dependencies: ["EfficientAttention", "CMallocInfo", "CAllocationCounter"],
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
