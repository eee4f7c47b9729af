// attention-bench: times the EfficientAttention conformers side by side.
// The harness lives in AttentionBenchCore (tested by the test suite); this is the entry point.
import AttentionBenchCore
import Foundation

exit(AttentionBenchCommand.main(Array(CommandLine.arguments.dropFirst())))
