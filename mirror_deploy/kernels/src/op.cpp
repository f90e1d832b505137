// The kernel as an OpenVINO op, `mirror_deploy::Q4MatMul`: y[..., N] = x[..., K] @ W^T with W in the
// layout of q4.h. Loaded with `Core.add_extension`; an ONNX node of that type and domain converts to it.
// Inputs: x (f32), codes (u8), scales and mins (u8: the bytes of fp16 values; a plugin pass converts
// f16 and u16 constants to wider types, never u8).
// Attributes: n, k, group. Columns are split over the calling arena's threads (the plugin's, sized by
// INFERENCE_NUM_THREADS); a column's bits do not depend on the split.
#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/partitioner.h>

#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/onnx/extension/op.hpp>
#include <openvino/op/op.hpp>
#include <vector>

#include "dispatch.h"

extern "C" const char* mirror_q4_why();   // dispatch.cpp: why this ISA path (or none)

namespace mirror_q4 {

class Q4MatMul : public ov::op::Op {
public:
    OPENVINO_OP("Q4MatMul", "mirror_deploy");

    Q4MatMul() = default;
    Q4MatMul(const ov::OutputVector& args, int64_t n, int64_t k, int64_t group)
        : Op(args), n_(n), k_(k), group_(group) {
        constructor_validate_and_infer_types();
    }

    void validate_and_infer_types() override {
        NODE_VALIDATION_CHECK(this, get_input_size() == 4, "Q4MatMul takes x, codes, scales, mins");
        NODE_VALIDATION_CHECK(this, n_ > 0 && n_ % kCols == 0, "n must be a positive multiple of 16, got ", n_);
        NODE_VALIDATION_CHECK(this, group_ > 0 && group_ % kChunk == 0 && k_ % group_ == 0,
                              "group must be a multiple of 8 dividing k, got group ", group_, " and k ", k_);
        NODE_VALIDATION_CHECK(this, get_input_element_type(1) == ov::element::u8, "codes must be u8");
        NODE_VALIDATION_CHECK(this, get_input_element_type(2) == ov::element::u8 &&
                              get_input_element_type(3) == ov::element::u8, "scales and mins must be u8 (fp16 bytes)");
        auto shape = get_input_partial_shape(0);
        NODE_VALIDATION_CHECK(this, shape.rank().is_static() && shape.rank().get_length() >= 1, "x needs a rank");
        const auto last = shape[shape.rank().get_length() - 1];
        NODE_VALIDATION_CHECK(this, last.compatible(k_), "x's last dimension ", last, " is not k = ", k_);
        shape[shape.rank().get_length() - 1] = n_;
        set_output_type(0, ov::element::f32, shape);
    }

    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
        return std::make_shared<Q4MatMul>(args, n_, k_, group_);
    }

    bool visit_attributes(ov::AttributeVisitor& v) override {
        v.on_attribute("n", n_);
        v.on_attribute("k", k_);
        v.on_attribute("group", group_);
        return true;
    }

    bool has_evaluate() const override { return true; }

    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
        const Isa path = isa();
        OPENVINO_ASSERT(path != Isa::none, "mirror_deploy::Q4MatMul: no kernel path for this CPU (",
                        mirror_q4_why(), ")");
        const ov::Tensor& x = inputs[0];
        ov::Shape shape = x.get_shape();
        const int64_t rows = static_cast<int64_t>(ov::shape_size(shape)) / k_;
        shape.back() = static_cast<size_t>(n_);
        outputs[0].set_shape(shape);
        const int64_t groups = k_ / group_;
        OPENVINO_ASSERT(inputs[1].get_size() == static_cast<size_t>(n_ * k_ / 2) &&
                        inputs[2].get_size() == static_cast<size_t>(2 * n_ * groups) &&
                        inputs[3].get_size() == static_cast<size_t>(2 * n_ * groups),
                        "mirror_deploy::Q4MatMul: weight sizes do not match n, k, group");
        const Weights w{inputs[1].data<const uint8_t>(),
                        reinterpret_cast<const uint16_t*>(inputs[2].data<const uint8_t>()),
                        reinterpret_cast<const uint16_t*>(inputs[3].data<const uint8_t>()), n_, k_, group_};
        thread_local std::vector<int8_t> codes;
        thread_local std::vector<float> scale, offset;
        codes.resize(static_cast<size_t>(rows * k_));
        scale.resize(static_cast<size_t>(rows * groups));
        offset.resize(scale.size());
        quantize_rows(x.data<const float>(), rows, k_, group_, codes.data(), scale.data(), offset.data());
        float* y = outputs[0].data<float>();
        const int64_t blocks = n_ / kCols;
        for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
            const Activations a{codes.data() + r0 * k_, scale.data() + r0 * groups, offset.data() + r0 * groups,
                                static_cast<int>(std::min<int64_t>(kMaxRows, rows - r0))};
            float* yr = y + r0 * n_;
            tbb::parallel_for(tbb::blocked_range<int64_t>(0, blocks, 4),
                              [&](const tbb::blocked_range<int64_t>& b) {
                                  matmul(path, w, a, yr, b.begin() * kCols, b.end() * kCols);
                              }, tbb::static_partitioner());
        }
        return true;
    }

private:
    int64_t n_ = 0, k_ = 0, group_ = 0;
};

}  // namespace mirror_q4

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>(
    {std::make_shared<ov::OpExtension<mirror_q4::Q4MatMul>>(),
     std::make_shared<ov::frontend::onnx::OpExtension<mirror_q4::Q4MatMul>>("Q4MatMul", "mirror_deploy")}));
