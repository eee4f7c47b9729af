// attention-fuzz: random problems through the public API of every conformer and the
// KV cache, valid and invalid, with crash isolation per case. See KernelDocs/Robustness.md.
//
//     attention-fuzz [--seconds N | --calls N] [--seed S] [--jobs J]   parent (default)
//     attention-fuzz --case SEED                                       one case, verbose
//     attention-fuzz --child --first-seed S --count K                  what the parent spawns

import EfficientAttention
import Foundation

let usage = """
    usage: attention-fuzz [--seconds N | --calls N] [--seed S] [--jobs J] [--batch K] [--timeout T]
           attention-fuzz --case SEED
      --seconds N   stop handing out cases after N seconds (default 60 unless --calls)
      --calls N     stop after about N public API calls
      --seed S      run seed; case seeds are S * 10^9 + 0, 1, 2, ... (default 1)
      --jobs J      child processes at a time (default 2)
      --batch K     cases per child (default 100)
      --timeout T   seconds before a child is killed as hung (default 60)
      --case SEED   run one case in this process and print what it does
    """

/// The value after `flag`, parsed, or exit with the usage.
func option<T>(_ flag: String, _ parse: (String) -> T?) -> T? {
    let arguments = CommandLine.arguments
    guard let i = arguments.firstIndex(of: flag) else { return nil }
    guard i + 1 < arguments.count, let value = parse(arguments[i + 1]) else {
        FileHandle.standardError.write(Data("attention-fuzz: \(flag) needs a value\n\(usage)\n".utf8))
        exit(2)
    }
    return value
}

let known: Set<String> = ["--seconds", "--calls", "--seed", "--jobs", "--batch", "--timeout", "--case", "--child",
                          "--first-seed", "--count"]
for argument in CommandLine.arguments.dropFirst() where argument.hasPrefix("--") && !known.contains(argument) {
    FileHandle.standardError.write(Data("attention-fuzz: unknown option \(argument)\n\(usage)\n".utf8))
    exit(2)
}

if CommandLine.arguments.contains("--child") {
    let first = option("--first-seed") { UInt64($0) } ?? 0
    let count = option("--count") { UInt64($0) } ?? 1
    for seed in first..<(first + count) {
        let fuzzCase = FuzzCase(seed: seed)
        fuzzCase.run()
        for failure in fuzzCase.failures {
            print("fail \(seed) \(failure.replacingOccurrences(of: "\n", with: " "))")
        }
        print("done \(seed) \(fuzzCase.calls)")
        fflush(nil)  // every stream: stdout
    }
    exit(0)
}

if let seed = option("--case", { UInt64($0) }) {
    print("case \(seed)")
    let fuzzCase = FuzzCase(seed: seed, verbose: true)
    fuzzCase.run()
    print("\(fuzzCase.calls) calls, \(fuzzCase.failures.count) failed checks")
    exit(fuzzCase.failures.isEmpty ? 0 : 1)
}

let calls = option("--calls") { Int($0) }
let limits = Supervisor.Limits(
    seconds: option("--seconds") { Double($0) } ?? (calls == nil ? 60 : nil),
    calls: calls,
    seed: option("--seed") { UInt64($0) } ?? 1,
    jobs: max(1, option("--jobs") { Int($0) } ?? 2),
    batch: max(1, option("--batch") { Int($0) } ?? 100),
    timeout: option("--timeout") { Double($0) } ?? 60)
exit(Supervisor(limits: limits).run() ? 0 : 1)
