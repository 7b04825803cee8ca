from comer.models.segmentor import EncoderDecoder, build_segmentor

__all__ = ["EncoderDecoder", "build_segmentor"]
