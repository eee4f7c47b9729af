import Testing
import EfficientAttention
import Foundation

@Test func smokeDenseMatchesVanilla() throws {
    let q = try Tensor.random(shape: [1, 2, 5, 3], seed: 1)
    let k = try Tensor.random(shape: [1, 2, 7, 3], seed: 2)
    let v = try Tensor.random(shape: [1, 2, 7, 4], seed: 3)
    let a = try DenseAttention(causal: true).attend(query: q, key: k, value: v)
    let b = try VanillaAttention(causal: true).attend(query: q, key: k, value: v)
    #expect(a.output.shape == [1, 2, 5, 4])
    #expect(zip(a.output.elements, b.output.elements).allSatisfy { abs($0 - $1) < 1e-5 })
}

@Test func smokeExp() {
    var worst: Double = 0
    var x: Float = -86.5
    while x < 88.7 {
        let v = SIMD16<Float>((0..<16).map { x + Float($0) * 0.0013 })
        let e = VectorMath.exp(v)
        for l in 0..<16 {
            let ref = Foundation.exp(Double(v[l]))
            worst = max(worst, abs(Double(e[l]) - ref) / ref)
        }
        x += 0.0173
    }
    print("worst rel", worst)
    #expect(worst < 3e-7)
    let special = VectorMath.exp(SIMD16<Float>(-.infinity, .infinity, .nan, 0, -1e4, 1e4, 89, -87, 88.7, -86.5, 1, -1, 2, 3, 4, 5))
    print(special)
}
